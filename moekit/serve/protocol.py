"""Request bodies of `/v1/completions` and `/v1/chat/completions` -> a validated `GenerateRequest`.

Parameters, ranges and defaults are those of OpenAI's API reference (Completions, Chat
Completions); vLLM's extra sampling parameters (top_k, min_p, repetition_penalty, ignore_eos,
stop_token_ids) are accepted too, as vLLM's server does. Every bad value is a 400 whose message
names the parameter, the rule and the value received, and whose `param` is the parameter's name.
Unknown fields are ignored (vLLM does the same, so clients that send newer fields keep working);
known features this server lacks (suffix, audio, ...) are a 400 rather than silently
ignored, because ignoring them would change the answer. Structured output (`response_format`, vLLM's
`guided_*`) and `logit_bias` are parsed by structured.py. Chat messages of a vision model may hold
image parts (vision_parts.py): they become `<image>` markers in the text and `GenerateRequest.images`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace

from moekit.config import VisionConfig
from moekit.infer import grammar
from moekit.infer.sampler import MAX_LOGPROBS, SamplingParams
from moekit.serve.errors import APIError, bad_request, show
from moekit.serve.structured import parse_constraint, parse_logit_bias
from moekit.serve.tools import ToolSpec, parse_tools, template_message
from moekit.serve.vision_parts import IMAGE_MARKER, ContentParser, check_image_count, check_no_marker

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 16  # stop strings per request (OpenAI allows 4; vLLM has no limit)
MAX_SEED = 2**63 - 1


@dataclass
class Limits:
    """What validation needs to know of the served model."""

    model_names: tuple[str, ...]
    vocab_size: int
    max_model_len: int
    max_n: int
    vision: VisionConfig | None = None  # the model's vision side; None: a text-only model (image parts are a 400)


@dataclass
class GenerateRequest:
    chat: bool
    model: str
    prompts: list  # completions: strings or token-id lists; chat: filled in from `messages` by the app
    messages: list[dict] | None  # chat, normalized to [{"role", "content": str}]
    params: SamplingParams  # max_tokens is resolved per prompt once its length is known
    max_tokens: int | None  # as given; None: the server default, capped by the context left
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # alternatives per token when logprobs are asked for, else None
    echo: bool = False
    images: list = field(default_factory=list)  # chat: (3, S, S) pixels, one per `<image>` marker, in order
    tools: ToolSpec | None = None  # chat: the functions the model may call, and tool_choice (tools.py)


# ---- typed getters: JSON null means "the default", as in OpenAI's API ------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _integer(body: dict, name: str, default, lo: int, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    rule = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    if isinstance(v, float) and v.is_integer():  # JSON Schema's integers include 2.0 (vLLM takes it too)
        v = int(v)
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        raise bad_request(f"{name} must be {rule}, got {show(v)}", name)
    return v


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
          and (v > lo if lo_open else v >= lo) and v <= hi)
    if not ok:
        if math.isfinite(hi):
            rule = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
        else:
            rule = f"{'>' if lo_open else '>='} {lo:g}"
        raise bad_request(f"{name} must be a number {rule}, got {show(v)}", name)
    return float(v)


def _boolean(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad_request(f"{name} must be true or false, got {show(v)}", name)
    return v


def _text(s: str, param: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate such as "\ud800" is valid JSON but not text
        raise bad_request(f"{param} contains an unpaired UTF-16 surrogate escape: send valid Unicode text",
                          param) from None
    return s


def _unsupported(body: dict, name: str, allowed: tuple, what: str) -> None:
    if body.get(name) not in (None, *allowed):
        raise bad_request(f"{name} is not supported by this server ({what}); remove it", name)


# ---- shared parameters ---------------------------------------------------------------------------
def _check_model(body: dict, limits: Limits) -> str:
    model = body.get("model")
    if model is None:  # vLLM serves its model when none is named
        return limits.model_names[0]
    if not isinstance(model, str):
        raise bad_request(f"model must be a string, got {show(model)}", "model")
    if model not in limits.model_names:
        raise APIError(404, f"The model `{model}` does not exist. This server serves: "
                            f"{', '.join(limits.model_names)} (see GET /v1/models)", param="model",
                       code="model_not_found")
    return model


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if (not isinstance(stops, list) or len(stops) > MAX_STOP
            or any(not isinstance(s, str) or not s for s in stops)):
        raise bad_request(f"stop must be a non-empty string or an array of at most {MAX_STOP} non-empty strings, "
                          f"got {show(v)}", "stop")
    return [_text(s, "stop") for s in stops]


def _token_ids(v, param: str, vocab_size: int) -> list[int]:
    bad = next((t for t in v if not _is_int(t) or not 0 <= t < vocab_size), None)
    if bad is not None:
        raise bad_request(f"{param} holds {show(bad)}, which is not a token id of this model: ids are integers in "
                          f"[0, {vocab_size})", param)
    return list(v)


def _sampling(body: dict, limits: Limits, logprobs: int | None) -> SamplingParams:
    top_k = _integer(body, "top_k", 0, -1)
    stop_token_ids = body.get("stop_token_ids")
    if stop_token_ids is not None and not isinstance(stop_token_ids, list):
        raise bad_request(f"stop_token_ids must be an array of token ids, got {show(stop_token_ids)}", "stop_token_ids")
    constraint, logit_bias = parse_constraint(body), parse_logit_bias(body, limits.vocab_size)
    try:
        return SamplingParams(
            max_tokens=1,  # resolved per prompt
            temperature=_number(body, "temperature", 1.0, 0, 2),
            top_p=_number(body, "top_p", 1.0, 0, 1, lo_open=True),
            top_k=max(top_k, 0),  # vLLM: -1 = off; moekit: 0 = off
            min_p=_number(body, "min_p", 0.0, 0, 1),
            presence_penalty=_number(body, "presence_penalty", 0.0, -2, 2),
            frequency_penalty=_number(body, "frequency_penalty", 0.0, -2, 2),
            repetition_penalty=_number(body, "repetition_penalty", 1.0, 0, math.inf, lo_open=True),
            seed=_integer(body, "seed", None, 0, MAX_SEED),
            stop=_stop(body),
            stop_token_ids=_token_ids(stop_token_ids or [], "stop_token_ids", limits.vocab_size),
            ignore_eos=_boolean(body, "ignore_eos", False),
            logprobs=logprobs,
            constraint=constraint,
            logit_bias=logit_bias,
        )
    except ValueError as e:  # SamplingParams' own checks; the getters above should catch everything first
        raise bad_request(str(e)) from None


def _common(body: dict, limits: Limits, n_prompts: int, min_tokens: int = 1) -> dict:
    n = _integer(body, "n", 1, 1, limits.max_n)
    if n * n_prompts > limits.max_n:
        raise bad_request(f"n x the number of prompts is {n * n_prompts}; this server returns at most "
                          f"{limits.max_n} choices per request", "n")
    max_tokens = _integer(body, "max_tokens", None, min_tokens)
    stream = _boolean(body, "stream", False)
    opts = body.get("stream_options")
    if opts is not None:
        if not stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        if not isinstance(opts, dict):
            raise bad_request(f"stream_options must be an object such as {{\"include_usage\": true}}, got {show(opts)}",
                              "stream_options")
    include_usage = _boolean(opts or {}, "include_usage", False)
    return dict(n=n, max_tokens=max_tokens, stream=stream, include_usage=include_usage)


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object, or a 400 that says what is wrong with it."""
    if not raw.strip():
        raise bad_request('the request body is empty: send a JSON object such as {"model": ..., "prompt": ...}')
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"the request body is not valid UTF-8 (byte {e.start}): send JSON encoded as UTF-8") from None

    def no_constant(name: str):  # Python's json accepts NaN and Infinity; JSON does not
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(text, parse_constant=no_constant)
    except json.JSONDecodeError as e:
        raise bad_request(f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except ValueError as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply to parse") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got a JSON {type(body).__name__}")
    return body


# ---- the two endpoints -----------------------------------------------------------------------------
def parse_completion(body: dict, limits: Limits) -> GenerateRequest:
    model = _check_model(body, limits)
    prompts = _prompts(body.get("prompt"), limits.vocab_size)
    if limits.vision is not None:
        _no_image_markers(prompts, limits.vision)
    # max_tokens 0: no output, only what echo and logprobs say about the prompt (OpenAI's minimum is 0)
    common = _common(body, limits, len(prompts), min_tokens=0)
    _unsupported(body, "suffix", ("",), "it does not insert text")
    if body.get("best_of") not in (None, common["n"]):
        raise bad_request(f"best_of must equal n ({common['n']}) on this server, got {show(body.get('best_of'))}",
                          "best_of")
    logprobs = _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    echo = _boolean(body, "echo", False)
    params = _sampling(body, limits, logprobs)
    if echo and logprobs is not None:  # the prompt's tokens get logprobs too (lm-evaluation-harness's loglikelihood)
        params = replace(params, prompt_logprobs=logprobs)
    return GenerateRequest(False, model, prompts, None, params, logprobs=logprobs, echo=echo, **common)


def parse_chat(body: dict, limits: Limits) -> GenerateRequest:
    model = _check_model(body, limits)
    parser = ContentParser(limits.vision, model)
    messages = _messages(body.get("messages"), parser)
    if body.get("max_completion_tokens") is not None:  # the newer name of max_tokens (OpenAI)
        body = {**body, "max_tokens": _integer(body, "max_completion_tokens", None, 1)}
    common = _common(body, limits, 1)
    for name, allowed in (("functions", ([],)), ("function_call", ("none",)), ("prediction", ()), ("audio", ())):
        _unsupported(body, name, allowed, "it has no legacy function calls (use tools), predicted outputs or audio")
    _unsupported(body, "modalities", (["text"],), "it writes text only")
    want = _boolean(body, "logprobs", False)
    top = _integer(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not want:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    logprobs = (top or 0) if want else None
    params, spec = _sampling(body, limits, logprobs), parse_tools(body)
    schema = spec.schema() if spec is not None else None
    if schema is not None:  # tool_choice "required" or a named function: the output is constrained to the call
        if params.constraint is not None:
            raise bad_request(f"tool_choice {show(body.get('tool_choice'))} constrains the output to a tool call "
                              "already: drop response_format (or the guided_* parameter)", "tool_choice")
        c = grammar.Constraint("json_schema", json.dumps(schema, ensure_ascii=True))
        try:
            grammar.check(c)
        except ValueError as e:
            raise bad_request(f"the tools' parameters cannot be used as a JSON schema for tool_choice "
                              f"{show(body.get('tool_choice'))}: {e}", "tools") from None
        params = replace(params, constraint=c)
    return GenerateRequest(True, model, [], messages, params, logprobs=logprobs, images=parser.images, tools=spec,
                           **common)


def _prompts(v, vocab_size: int) -> list:
    if isinstance(v, str):
        return [_text(v, "prompt")]
    if isinstance(v, list) and v:
        if all(isinstance(p, str) for p in v):
            return [_text(p, "prompt") for p in v]
        if all(_is_int(t) for t in v):
            return [_token_ids(v, "prompt", vocab_size)]
        if all(isinstance(p, list) and p for p in v):
            return [_token_ids(p, "prompt", vocab_size) for p in v]
    if v is None:
        raise bad_request("prompt is missing: give the text to continue", "prompt")
    raise bad_request("prompt must be a string, an array of strings, an array of token ids or an array of "
                      f"non-empty token-id arrays, got {show(v)}", "prompt")


def _no_image_markers(prompts: list, vision: VisionConfig) -> None:
    """Completions carry no images, so a vision model's prompt may not hold the marker (as text or token id)."""
    for p in prompts:
        if (IMAGE_MARKER in p) if isinstance(p, str) else (vision.image_token_id in p):
            raise bad_request(f"the prompt holds the image marker {IMAGE_MARKER} (token {vision.image_token_id}), "
                              "but /v1/completions takes no images: send images to /v1/chat/completions as "
                              'image_url content parts ({"type": "image_url", "image_url": {"url": '
                              '"data:image/png;base64,..."}}), or remove the marker', "prompt")


def _messages(v, parser: ContentParser) -> list[dict]:
    if not isinstance(v, list) or not v:
        raise bad_request('messages must be a non-empty array such as [{"role": "user", "content": "Hi"}], '
                          f"got {show(v)}", "messages")
    check_image_count(v, parser.vision)
    out = []
    for i, m in enumerate(v):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{p} must be an object with a role and a content, got {show(m)}", p)
        role = m.get("role")
        if role not in ROLES:
            raise bad_request(f"{p}.role must be one of {', '.join(ROLES)}; got {show(role)}", f"{p}.role")
        calls = template_message(m, p)  # an assistant's earlier tool_calls, a tool message's tool_call_id
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        elif isinstance(content, list):
            content = parser.content(content, f"{p}.content")
        elif isinstance(content, str):
            content = check_no_marker(content, f"{p}.content", parser.vision)
        else:
            parts = "text parts" if parser.vision is None else "text and image_url parts"
            raise bad_request(f"{p}.content must be a string or an array of {parts}, got {show(content)}",
                              f"{p}.content")
        out.append({"role": role, "content": _text(content, f"{p}.content"), **calls})
    return out


# ---- vLLM's /tokenize and /detokenize ----------------------------------------------------------------
@dataclass
class TokenizeRequest:
    model: str
    prompt: str | None  # or messages, rendered as /v1/chat/completions renders them
    messages: list[dict] | None
    add_special_tokens: bool  # True: the ids the endpoints feed the model (a moekit run's <|endoftext|> first)
    return_token_strs: bool


def parse_tokenize(body: dict, limits: Limits) -> TokenizeRequest:
    """vLLM's TokenizeCompletionRequest {prompt} or TokenizeChatRequest {messages}, with add_special_tokens and
    return_token_strs."""
    model = _check_model(body, limits)
    if (body.get("prompt") is None) == (body.get("messages") is None):
        raise bad_request('give exactly one of prompt (a string) or messages (as for /v1/chat/completions)', "prompt")
    prompt = messages = None
    if body.get("prompt") is not None:
        if not isinstance(body["prompt"], str):
            raise bad_request(f"prompt must be a string, got {show(body['prompt'])}", "prompt")
        prompt = _text(body["prompt"], "prompt")
    else:
        messages = _messages(body["messages"], ContentParser(limits.vision, model))
    return TokenizeRequest(model, prompt, messages, _boolean(body, "add_special_tokens", True),
                           _boolean(body, "return_token_strs", False))


def parse_detokenize(body: dict, limits: Limits) -> list[int]:
    """vLLM's DetokenizeRequest {model, tokens}: the token ids."""
    _check_model(body, limits)
    tokens = body.get("tokens")
    if not isinstance(tokens, list):
        raise bad_request(f"tokens must be an array of token ids, got {show(tokens)}", "tokens")
    return _token_ids(tokens, "tokens", limits.vocab_size)
