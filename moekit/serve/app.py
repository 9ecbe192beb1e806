"""The FastAPI app: OpenAI's endpoints over an AsyncEngine, with auth, limits and OpenAI-shaped errors.

    app = build_app(ServeConfig(model="runs/tiny"), load=lambda: Engine(...))
    uvicorn.run(app, host="127.0.0.1", port=8000)        # `moekit serve` does this (cli.py)

Routes: GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions, and vLLM's
POST /tokenize, POST /detokenize, GET /tokenizer_info (these need `Authorization: Bearer KEY` when the server
has a key), GET /health (200 when ready, 503 while loading, shutting down or after an engine failure),
GET /metrics (Prometheus), GET /version, GET /openapi.json and /docs (the request bodies typed by openapi.py).
Every error, unknown routes included, is `{"error": {message, type, param, code}}`; a bug answers 500 with an id
that the log's traceback carries too.

A request goes: key (401, compared in constant time with `hmac.compare_digest`) -> state (503)
-> body size (413, checked on Content-Length before reading and while reading) -> JSON and
parameters (400, protocol.py) -> chat template and tokenization -> context length (400 that
states the limit) -> admission (429 with Retry-After when the waiting queue is full) -> engine.
Streams are server-sent events, `data: {chunk}` ... `data: [DONE]` (OpenAI); a client that
disconnects, streaming or not, has its requests aborted, which frees their KV blocks before the
engine's next step. An error after a stream started is sent as a `data: {"error": ...}` event,
which the official clients raise.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

import moekit
from moekit.infer.engine import Engine
from moekit.serve import openapi, protocol, tools
from moekit.serve.async_engine import AsyncEngine, Handle
from moekit.serve.chat import DEFAULT_JINJA, ChatTemplate
from moekit.serve.config import ServeConfig
from moekit.serve.errors import APIError, bad_request, error_body
from moekit.serve.metrics import ServerMetrics
from moekit.serve.responses import Responder, TokenText

log = logging.getLogger("moekit.serve")
DRAIN_CAP = 64 * 1024 * 1024  # an oversized body is read (and dropped) up to this, so the 413 reaches the client
ROUTES = ("GET /v1/models, POST /v1/completions, POST /v1/chat/completions, POST /tokenize, POST /detokenize, "
          "GET /tokenizer_info, GET /health, GET /metrics")


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class _EventStream(StreamingResponse):
    """A StreamingResponse that aborts its requests however it ends (finished, disconnected, cancelled)."""

    def __init__(self, content, handle: Handle, headers: dict):
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.handle = handle

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except asyncio.CancelledError:  # the SIGTERM drain timed out (uvicorn cancels): end the stream properly
            self.handle.close()
            end = _sse(error_body(503, "The request was cancelled: the server is shutting down; retry later",
                                  code="service_unavailable")) + "data: [DONE]\n\n"
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": end.encode(), "more_body": False})
        finally:
            self.handle.close()


class OpenAIServer:
    def __init__(self, cfg: ServeConfig, load: Callable[[], Engine], template: ChatTemplate):
        self.cfg, self.template = cfg, template
        self.created = int(time.time())
        self.engine = AsyncEngine(load, max_num_seqs=cfg.max_num_seqs, max_waiting=cfg.max_waiting,
                                  log_interval=cfg.log_interval)
        self.metrics = ServerMetrics(lambda: self.engine.snapshot, lambda: self.engine.state)
        self.engine.metrics = self.metrics
        self._limits: protocol.Limits | None = None
        # How "auto" tool calls are found in the output: --tool-call-parser, else the format the template teaches.
        self.tool_parser = cfg.tool_call_parser or tools.detect_parser(template.source)
        self._token_text: TokenText | None = None

    def drain(self) -> None:
        """SIGTERM: refuse new requests (503) and let the ones in flight finish."""
        if self.engine.state in ("loading", "ready"):
            self.engine.state = "draining"
            log.info("draining: %d requests in flight; new requests get 503", self.engine.inflight)

    # ---- checks --------------------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        key = self.cfg.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "Missing API key: send the header `Authorization: Bearer YOUR_KEY`",
                           code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "Incorrect API key provided: use the key this server was started with (--api-key)",
                           code="invalid_api_key")

    async def _read_body(self, request: Request) -> bytes:
        limit = self.cfg.max_body_bytes
        stream = request.stream().__aiter__()
        declared = request.headers.get("content-length", "")
        size, chunks = 0, []
        if not (declared.isdigit() and int(declared) > limit):
            async for chunk in stream:
                size += len(chunk)
                if size > limit:
                    break
                chunks.append(chunk)
            else:
                return b"".join(chunks)
        async for chunk in stream:  # read the rest and drop it, so that the client reads our answer
            size += len(chunk)
            if size > DRAIN_CAP:
                break
        size = max(size, int(declared) if declared.isdigit() else 0)
        raise APIError(413, f"The request body is {size:,} bytes; this server accepts at most {limit:,} "
                            "(--max-body-bytes): send a smaller request", code="request_too_large")

    def _limits_now(self) -> protocol.Limits:
        if self._limits is None:
            e = self.engine.engine
            self._limits = protocol.Limits(tuple(self.cfg.served_model_names), e.cfg.vocab_size, e.max_model_len,
                                           self.cfg.max_n, e.cfg.vision if e.cfg.has_vision else None)
            self._token_text = TokenText(e.codec)
        return self._limits

    # ---- routes ------------------------------------------------------------------------------------
    async def health(self) -> Response:
        self.engine.check_ready()
        return JSONResponse({"status": "ok"})

    async def metrics_route(self) -> Response:
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    def _model_card(self, name: str) -> dict:
        limits = self._limits_now()
        card = {"id": name, "object": "model", "created": self.created, "owned_by": "moekit", "root": self.cfg.model,
                "parent": None, "max_model_len": limits.max_model_len,
                # Not in OpenAI's model object (nor vLLM's): a client needs some way to know that image_url parts
                # are welcome. The name and values are OpenRouter's `architecture.input_modalities`.
                "input_modalities": ["text"] if limits.vision is None else ["text", "image"]}
        if limits.vision is not None:
            card["max_images"] = limits.vision.max_images  # per request (more is a 400 that states it)
        return card

    async def models(self, request: Request) -> Response:
        self._auth(request)
        self.engine.check_ready()
        return JSONResponse({"object": "list", "data": [self._model_card(n) for n in self.cfg.served_model_names]})

    async def model(self, request: Request, model_id: str) -> Response:
        self._auth(request)
        self.engine.check_ready()
        if model_id not in self.cfg.served_model_names:
            raise APIError(404, f"The model `{model_id}` does not exist. This server serves: "
                                f"{', '.join(self.cfg.served_model_names)}", param="model", code="model_not_found")
        return JSONResponse(self._model_card(model_id))

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    # ---- vLLM's tokenizer endpoints (evaluation harnesses count context lengths with them) ----------------
    def _codec(self):
        codec = self.engine.engine.codec
        if codec is None:
            raise bad_request("this model has no tokenizer: there is nothing to tokenize with")
        return codec

    async def tokenize(self, request: Request) -> Response:
        """POST /tokenize {prompt | messages, add_special_tokens, return_token_strs}: {count, max_model_len, tokens,
        token_strs}. By default the ids are exactly what /v1/completions (prompt) or /v1/chat/completions (messages,
        rendered by the chat template) would feed the model."""
        self._auth(request)
        self.engine.check_ready()
        limits = self._limits_now()
        req = protocol.parse_tokenize(protocol.parse_json(await self._read_body(request)), limits)
        codec = self._codec()
        text = req.prompt
        if req.messages is not None:
            try:
                text = self.template.render(req.messages)
            except ValueError as e:
                raise bad_request(str(e), "messages") from None
        ids = (codec.encode(text) if req.add_special_tokens
               else codec.tokenizer.encode(text, add_special_tokens=False).ids)
        return JSONResponse({"count": len(ids), "max_model_len": limits.max_model_len, "tokens": ids,
                             "token_strs": [self._token_text(i) for i in ids] if req.return_token_strs else None})

    async def tokenizer_info(self, request: Request) -> Response:
        """GET /tokenizer_info (vLLM's): the special tokens and the chat template, so that a client (lm-evaluation-
        harness's remote tokenizer) can tokenize with /tokenize and render chats as this server does."""
        self._auth(request)
        self.engine.check_ready()
        codec, limits = self._codec(), self._limits_now()
        bos = codec.bos_token_id if codec.bos_token_id is not None else (codec.prefix_ids or (None,))[0]
        eos = codec.eos_token_ids[0] if codec.eos_token_ids else None
        name = codec.tokenizer.id_to_token
        return JSONResponse({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": limits.max_model_len,
                             "eos_token": name(eos) if eos is not None else None,
                             "bos_token": name(bos) if bos is not None else None, "pad_token": None,
                             "chat_template": self.template.source or DEFAULT_JINJA})

    async def detokenize(self, request: Request) -> Response:
        """POST /detokenize {tokens}: {prompt}, special tokens included (vLLM's: the inverse of /tokenize)."""
        self._auth(request)
        self.engine.check_ready()
        ids = protocol.parse_detokenize(protocol.parse_json(await self._read_body(request)), self._limits_now())
        return JSONResponse({"prompt": self._codec().tokenizer.decode(ids, skip_special_tokens=False)})

    # ---- generation --------------------------------------------------------------------------------
    async def _encode(self, prompt, param: str) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        codec = self.engine.engine.codec
        if codec is None:
            raise bad_request("this model has no tokenizer: send the prompt as token ids", param)
        # A long text is tokenized off the event loop, which keeps serving the other clients meanwhile.
        ids = codec.encode(prompt) if len(prompt) < 8192 else await asyncio.to_thread(codec.encode, prompt)
        if not ids:
            raise bad_request(f"the {param} is empty once tokenized: give some text", param)
        return ids

    def _max_tokens(self, req: protocol.GenerateRequest, n_prompt: int, param: str) -> int:
        ctx = self._limits_now().max_model_len
        if n_prompt >= ctx:
            raise bad_request(f"This model's maximum context length is {ctx} tokens, and your prompt has {n_prompt} "
                              f"tokens, which leaves no room for output: shorten the {param}", param,
                              code="context_length_exceeded")
        if req.max_tokens is None:
            return min(self.cfg.max_tokens_default, ctx - n_prompt)
        if n_prompt + req.max_tokens > ctx:
            raise bad_request(f"This model's maximum context length is {ctx} tokens. However, you requested "
                              f"{n_prompt + req.max_tokens} tokens ({n_prompt} in the {param}, {req.max_tokens} in "
                              f"the completion): reduce the length of the {param} or max_tokens", "max_tokens",
                              code="context_length_exceeded")
        return req.max_tokens

    async def _generate(self, request: Request, chat: bool) -> Response:
        self._auth(request)
        self.engine.check_ready()
        raw = await self._read_body(request)
        body = protocol.parse_json(raw)
        limits = self._limits_now()
        if chat and limits.vision is not None and len(raw) > 64 * 1024:  # images to decode: off the event loop
            req = await asyncio.to_thread(protocol.parse_chat, body, limits)
        else:
            req = protocol.parse_chat(body, limits) if chat else protocol.parse_completion(body, limits)
        param = "messages" if chat else "prompt"
        if chat:
            functions = self._tools_for(req)
            try:
                req.prompts = [self.template.render(req.messages, functions)]
            except ValueError as e:
                raise bad_request(str(e), "messages") from None
            if self.template.stop:
                stops = req.params.stop + [s for s in self.template.stop if s not in req.params.stop]
                req.params = dataclasses.replace(req.params, stop=stops)
        prompt_ids = [await self._encode(p, param) for p in req.prompts]
        if limits.vision is not None:
            self._check_markers(prompt_ids, req.images, limits.vision)
        seed = req.params.seed
        items = []
        for ids in prompt_ids:
            # max_tokens 0 (echo, logprobs of the prompt): one token is sampled and dropped (responses.py)
            params = dataclasses.replace(req.params, max_tokens=max(1, self._max_tokens(req, len(ids), param)))
            # n choices of one seeded request get seeds seed, seed + 1, ... (vLLM's parallel sampling)
            items += [(ids, params if seed is None or i == 0 else dataclasses.replace(params, seed=seed + i))
                      for i in range(req.n)]
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        echo = None
        if req.echo:
            codec = self.engine.engine.codec
            echo = [p if isinstance(p, str) else codec.decode(p) if codec else "" for p in req.prompts]
        responder = Responder(req, rid, int(time.time()), self._token_text, echo, prompt_ids, self.tool_parser)
        # Every engine request of a chat request (its n choices) reads the same images.
        handle = await (self.engine.submit(items, rid, images=req.images) if req.images
                        else self.engine.submit(items, rid))
        headers = {"X-Request-Id": rid}
        if req.stream:
            return _EventStream(self._stream(handle, responder), handle,
                                {**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._collect(request, handle, responder, headers)

    def _tools_for(self, req: protocol.GenerateRequest) -> list[dict] | None:
        """The functions the chat template is given; a 400 when the request has tools and the template cannot
        call them (it never reads `tools`: moekit's plain-text default, or a model without tool calls)."""
        if req.tools is None:
            return None
        if not tools.defines_tools(self.template.source):
            raise bad_request(f"this model's chat template ({self.template.origin}) does not define tool calls, so "
                              "the model cannot call tools: send the request without tools, or serve the model with "
                              "a --chat-template that reads `tools` (Hugging Face's convention)", "tools")
        return req.tools.tools

    @staticmethod
    def _check_markers(prompt_ids: list[list[int]], images: list, vision) -> None:
        """One `<image>` token per image: protocol.py made one marker text per image and refused literal ones, so
        a mismatch here is the model folder's fault (its tokenizer or chat template), not the client's."""
        if images and vision.image_token_id < 0:
            raise APIError(500, "this model has a vision encoder but no image marker token (vision.image_token_id "
                                "is -1 in its config): it cannot read images yet", code="image_marker_mismatch")
        for ids in prompt_ids:
            found = ids.count(vision.image_token_id)
            if found != len(images):
                raise APIError(500, f"the prompt has {found} image marker tokens (id {vision.image_token_id}, "
                                    f"vision.image_token_id) for {len(images)} images: this model's tokenizer does "
                                    "not read <image> as that token, or its chat template drops or repeats message "
                                    "content; fix the model folder", code="image_marker_mismatch")

    async def _stream(self, handle: Handle, responder: Responder):
        try:
            for chunk in responder.first_chunks():
                yield _sse(chunk)
            async for events in handle.events():
                parts = []
                for ev in events:
                    delta = responder.add(ev)
                    if delta is not None:
                        parts.append(_sse(responder.delta_chunk(ev.index, *delta)))
                if parts:
                    yield "".join(parts)
            if responder.req.include_usage:
                yield _sse(responder.usage_chunk())
        except APIError as e:  # the status line is sent already: the error travels as an event
            self.metrics.errors.labels(str(e.status)).inc()
            yield _sse(e.body())
        finally:
            handle.close()
        yield "data: [DONE]\n\n"

    async def _collect(self, request: Request, handle: Handle, responder: Responder, headers: dict) -> Response:
        async def gather() -> None:
            async for events in handle.events():
                for ev in events:
                    responder.add(ev)

        async def disconnected() -> None:  # the body is read: the next message is the client leaving
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work, gone = asyncio.ensure_future(gather()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, gone):
                task.cancel()
            handle.close()
        if not work.cancelled() and work.done():
            work.result()  # an APIError from the engine is raised here
            return JSONResponse(responder.response(), headers=headers)
        return Response(status_code=499)  # nobody is listening (nginx's "client closed request")


def build_app(cfg: ServeConfig, load: Callable[[], Engine], template: ChatTemplate | None = None) -> FastAPI:
    """The app; `load` builds the Engine in the engine thread (the server answers 503 until it returns)."""
    server = OpenAIServer(cfg, load, template or ChatTemplate())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.engine.start()
        yield
        await server.engine.stop()

    # /openapi.json and /docs (FastAPI's own), with the request bodies typed by openapi.py
    app = FastAPI(title="moekit", version=moekit.__version__, lifespan=lifespan, redoc_url=None,
                  description="An OpenAI-compatible server (moekit serve); every error is "
                              '`{"error": {message, type, param, code}}`.')
    app.state.server = server
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/metrics", server.metrics_route, methods=["GET"])
    app.add_api_route("/version", lambda: {"version": moekit.__version__}, methods=["GET"])
    app.add_api_route("/v1/models", server.models, methods=["GET"], **openapi.route_docs("/v1/models"))
    app.add_api_route("/v1/models/{model_id:path}", server.model, methods=["GET"],
                      **openapi.route_docs("/v1/models/{model_id}"))
    app.add_api_route("/v1/completions", server.completions, methods=["POST"],
                      **openapi.route_docs("/v1/completions"))
    app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"],
                      **openapi.route_docs("/v1/chat/completions"))
    app.add_api_route("/tokenize", server.tokenize, methods=["POST"], **openapi.route_docs("/tokenize"))
    app.add_api_route("/detokenize", server.detokenize, methods=["POST"], **openapi.route_docs("/detokenize"))
    app.add_api_route("/tokenizer_info", server.tokenizer_info, methods=["GET"],
                      **openapi.route_docs("/tokenizer_info"))
    openapi.install(app)

    def error_response(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
        response = JSONResponse(body, status_code=status, headers=headers)  # rendered first: an error answer that
        server.metrics.errors.labels(str(status)).inc()  # cannot be encoded ends as the one 500 below, counted once
        return response

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.body(), e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        if e.status_code == 404:
            return error_response(404, error_body(404, f"Unknown route {where}; this server has {ROUTES}",
                                                  code="unknown_url"))
        if e.status_code == 405:  # Starlette's 405 names the route's methods in Allow (RFC 9110 section 15.5.6)
            allow = (e.headers or {}).get("Allow", "")
            return error_response(405, error_body(405, f"{where} is not allowed (this route takes {allow or '?'}); "
                                                       f"this server has {ROUTES}", code="method_not_allowed"),
                                  {"Allow": allow} if allow else None)
        return error_response(e.status_code, error_body(e.status_code, str(e.detail)), e.headers)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, e: ClientDisconnect) -> Response:
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:  # a bug: say so, keep serving
        # The last resort: the traceback goes to the log under an id the client gets too, so that a report can be
        # matched to it; the message carries the exception's type only (its text may echo anything).
        rid = f"err-{uuid.uuid4().hex[:16]}"
        log.exception("internal error %s on %s %s", rid, request.method, request.url.path)
        return error_response(500, error_body(500, f"Internal server error ({type(e).__name__}); please report it "
                                                   f"with the request id {rid}", code="internal_error"),
                              {"X-Request-Id": rid})

    return app
