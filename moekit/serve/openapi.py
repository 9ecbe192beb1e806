"""The server's contract for `/openapi.json` and `/docs`: typed request and response models for every route.

    app.add_api_route("/v1/completions", ..., **route_docs("/v1/completions"))
    install(app)          # puts the request models into the document's components

The routes read their body by hand (protocol.py parses and checks it, so that errors are OpenAI-shaped and
bodies are size-limited), so FastAPI cannot see what they accept. These pydantic models describe it — the
fields protocol.py reads, with their types, ranges, defaults and meaning — and are attached to each route as
documentation only (`openapi_extra` for the request body, `responses=` for the answers); nothing parses a
request with them. They follow OpenAI's API reference (CreateCompletionRequest, CreateChatCompletionRequest)
and vLLM's extra sampling parameters and /tokenize, /detokenize (vLLM's `protocol.py`). Fields that OpenAI
has and this server refuses with a 400 (suffix, audio, ...) are left out; unknown fields are ignored
(additionalProperties is allowed), as protocol.py does. A field protocol.py learns belongs here too.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from moekit.infer.sampler import MAX_LOGPROBS
from moekit.serve.config import MAX_N
from moekit.serve.protocol import MAX_SEED, MAX_STOP, ROLES

REF = "#/components/schemas/{model}"


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are ignored, not refused (protocol.py)


# ---- requests ---------------------------------------------------------------------------------------
ModelName = Annotated[str | None, Field(description="A name from GET /v1/models; default: the first served model")]
Stop = Annotated[str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP)] | None,
                 Field(description=f"Up to {MAX_STOP} strings that end the output; they are not included in it")]


class StreamOptions(_Open):
    include_usage: bool = Field(False, description="A last chunk, with no choices, carries the usage")


class JSONSchemaFormat(_Open):
    name: str = Field(min_length=1)
    schema_: dict[str, Any] = Field(alias="schema", description="The JSON schema (compiled strict, as vLLM does)")
    strict: bool | None = None


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = Field(None, description="With type json_schema")


class _Sampling(_Open):
    """The sampling parameters both generation endpoints share (OpenAI's, then vLLM's extras)."""

    n: int = Field(1, ge=1, le=MAX_N, description="Choices to generate (n x prompts <= --max-n)")
    stream: bool = Field(False, description="Send server-sent events `data: {chunk}` ... `data: [DONE]`")
    stream_options: StreamOptions | None = Field(None, description="Only with stream: true")
    temperature: float = Field(1.0, ge=0, le=2, description="0: greedy decoding")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: the smallest set of tokens with this mass")
    stop: Stop = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Reproducible sampling; choice i uses seed + i")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    top_k: int = Field(0, ge=-1, description="vLLM: sample from the k likeliest tokens; 0 or -1: off")
    min_p: float = Field(0.0, ge=0, le=1, description="vLLM: drop tokens below min_p x the likeliest one's probability")
    repetition_penalty: float = Field(1.0, gt=0, description="vLLM: > 1 discourages tokens already seen")
    ignore_eos: bool = Field(False, description="vLLM: keep generating past the end-of-sequence token")
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, description="vLLM: token ids that end it")
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, description="Token id (as a string) -> bias added to its logit before sampling")
    # structured output (structured.py): at most one constraint per request
    response_format: ResponseFormat | None = Field(None, description="OpenAI's: text, json_object or json_schema")
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM: a JSON schema the output follows")
    guided_regex: str | None = Field(None, description="vLLM: a regular expression the whole output matches")
    guided_choice: list[str] | None = Field(None, description="vLLM: the output is one of these strings")
    guided_grammar: str | None = Field(None, description="vLLM: an EBNF grammar (rule `root`) the output matches")
    structured_outputs: dict[str, Any] | None = Field(
        None, description="vLLM's newer spelling: one of json, regex, choice, grammar, json_object")


class CompletionRequest(_Sampling):
    """POST /v1/completions (OpenAI's legacy Completions)."""

    model: ModelName = None
    prompt: str | list[str] | list[Annotated[int, Field(ge=0)]] | list[list[Annotated[int, Field(ge=0)]]] = Field(
        description="A text, texts (one answer per text and n), token ids, or arrays of token ids")
    max_tokens: int | None = Field(None, ge=0, description="Tokens to generate; default: --max-tokens-default, "
                                                           "capped by the context left; 0: none (echo + logprobs)")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Return the log-probability of each "
                                 "token and of this many likeliest alternatives")
    echo: bool = Field(False, description="Start the text with the prompt (with logprobs: the prompt's logprobs too)")
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="Only best_of = n is accepted")


class TextPart(_Open):
    type: Literal["text"]
    text: str


class ImageURL(_Open):
    url: str = Field(description="A data URL (data:image/png;base64,...): the server fetches nothing")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Open):
    type: Literal["image_url"]
    image_url: ImageURL | str = Field(description="Vision models only (GET /v1/models: input_modalities)")


class FunctionCall(_Open):
    name: str
    arguments: str = Field(description="The arguments as a JSON object in a string")


class ToolCall(_Open):
    id: str
    type: Literal["function"]
    function: FunctionCall


class Message(_Open):
    role: Literal[ROLES]  # type: ignore[valid-type]
    content: str | list[TextPart | ImagePart] | None = Field(description="null only for an assistant message")
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant's earlier calls")
    tool_call_id: str | None = Field(None, description="A tool message: the call it answers")


class Function(_Open):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="The arguments' JSON schema")
    strict: bool | None = None


class Tool(_Open):
    type: Literal["function"]
    function: Function


class NamedToolChoice(_Open):
    type: Literal["function"]
    function: dict[str, str] = Field(description='{"name": ...}: a function of tools')


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions; messages are rendered by the chat template (--chat-template)."""

    model: ModelName = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate (default: --max-tokens-default, "
                                                           "capped by the context left)")
    max_completion_tokens: int | None = Field(None, ge=1, description="The newer name of max_tokens; wins over it")
    logprobs: bool = Field(False, description="Return the log-probability of each output token")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Alternatives per token (with logprobs)")
    tools: list[Tool] | None = Field(None, description="Functions the model may call (a model whose chat template "
                                                       "defines tool calls; others answer 400)")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None


class TokenizeRequest(_Open):
    """POST /tokenize (vLLM's): exactly one of prompt or messages."""

    model: ModelName = None
    prompt: str | None = Field(None, description="A text, tokenized as /v1/completions does")
    messages: list[Message] | None = Field(None, min_length=1, description="Rendered as /v1/chat/completions does")
    add_special_tokens: bool = Field(True, description="false: the text's tokens only")
    return_token_strs: bool = Field(False, description="Also return each token's text")


class DetokenizeRequest(_Open):
    """POST /detokenize (vLLM's)."""

    model: ModelName = None
    tokens: list[Annotated[int, Field(ge=0)]]


# ---- responses --------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str = Field(description="What is wrong and what to do")
    type: str = Field(description="invalid_request_error, rate_limit_error or server_error")
    param: str | None = Field(description="The request field at fault, if one is")
    code: str | None


class ErrorResponse(BaseModel):
    """Every error, whatever its status (OpenAI's shape)."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] = Field(description="cached_tokens: prompt tokens read from the prefix cache")


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = Field(description="{tokens, token_logprobs, top_logprobs, text_offset}")
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None = Field(description="Always null: the server never refuses in words")
    tool_calls: list[ToolCall] | None = Field(None, description="With tools: the calls the model made")


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None = Field(description="{content: [{token, logprob, bytes, top_logprobs}], refusal}")
    finish_reason: Literal["stop", "length", "tool_calls"] | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str = Field(description="The model folder")
    parent: str | None
    max_model_len: int = Field(description="Context length in tokens (vLLM's field)")
    input_modalities: list[Literal["text", "image"]] = Field(description="OpenRouter's field: image for vision models")
    max_images: int | None = Field(None, description="Images per request (vision models)")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    tokenizer_class: str
    model_max_length: int
    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    chat_template: str = Field(description="The Jinja chat template /v1/chat/completions renders with")


# ---- routes -----------------------------------------------------------------------------------------
def _errors(*statuses: int) -> dict:
    what = {400: "A bad parameter or body (the message names it)", 401: "A missing or wrong API key",
            404: "An unknown model", 405: "Wrong method (the Allow header lists the right ones)",
            408: "The request did not arrive in time (--header-timeout, --body-timeout)",
            413: "The body is larger than --max-body-bytes", 429: "The waiting queue is full (Retry-After)",
            503: "Loading, shutting down, or more open connections than --max-connections"}
    return {s: {"model": ErrorResponse, "description": what[s]} for s in statuses}


_GENERATE = (400, 401, 404, 408, 413, 429, 503)
ROUTES: dict[str, tuple[type[BaseModel] | None, type[BaseModel], tuple[int, ...], str]] = {
    # path: (request body, 200 answer, error statuses, summary)
    "/v1/models": (None, ModelList, (401, 503), "The served models"),
    "/v1/models/{model_id}": (None, ModelCard, (401, 404, 503), "One served model"),
    "/v1/completions": (CompletionRequest, Completion, _GENERATE, "Complete a prompt (stream: text/event-stream)"),
    "/v1/chat/completions": (ChatCompletionRequest, ChatCompletion, _GENERATE,
                             "Answer a conversation (stream: text/event-stream)"),
    "/tokenize": (TokenizeRequest, TokenizeResponse, (400, 401, 404, 408, 413, 503), "Tokenize (vLLM's endpoint)"),
    "/detokenize": (DetokenizeRequest, DetokenizeResponse, (400, 401, 404, 408, 413, 503),
                    "Token ids to text (vLLM's endpoint)"),
    "/tokenizer_info": (None, TokenizerInfo, (400, 401, 503), "Special tokens and chat template (vLLM's endpoint)"),
}


def route_docs(path: str) -> dict:
    """add_api_route's documentation arguments for `path` (a key of ROUTES)."""
    body, answer, errors, summary = ROUTES[path]
    ok: dict = {"model": answer}
    if path.endswith("completions"):
        ok["content"] = {"text/event-stream": {"schema": {"type": "string", "description": "With stream: true, "
                                                          "lines `data: {chunk}`, then `data: [DONE]`"}}}
    docs: dict = {"summary": summary, "response_model": None, "responses": {200: ok, **_errors(*errors)}}
    if body is not None:
        docs["openapi_extra"] = {"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": REF.format(model=body.__name__)}}}}}
    return docs


def install(app: FastAPI) -> None:
    """Add the request models (and the models they use) to the document's components, which FastAPI fills only
    from the models it parses with."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = build()
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            for body, *_ in ROUTES.values():
                if body is not None:
                    schema = body.model_json_schema(ref_template=REF)
                    schemas.update(schema.pop("$defs", {}))
                    schemas[body.__name__] = schema
            # FastAPI documents a 422 for routes with parameters; these never send one (nothing validates with it)
            for ops in doc["paths"].values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
        return app.openapi_schema

    app.openapi = openapi
