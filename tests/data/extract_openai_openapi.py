"""Cut OpenAI's published OpenAPI document down to what `moekit serve` serves, for tests/test_serve_fuzz.py.

    git clone https://github.com/openai/openai-openapi && python tests/data/extract_openai_openapi.py \\
        openai-openapi/openapi.json tests/data/openai_openapi.json [--commit SHA]

Keeps GET /models, GET /models/{model}, POST /completions and POST /chat/completions (paths relative to the
server URL, https://api.openai.com/v1 there, http://HOST:PORT/v1 here) with every component they reference,
verbatim, except `x-oaiMeta` (the reference site's examples and names, no schema). OpenAI's document lists
only 200 (and 429) answers, and describes event streams in a way validators read differently: what moekit adds
is in ONE marked place below (MOEKIT_ERRORS: `#/components/responses/MoekitError`; moekit_streams: `itemSchema`
for text/event-stream, `MoekitCompletionStreamChunk`, null logprobs of an echoed first prompt token), each piece
described "ADDED BY MOEKIT".
The source is MIT-licensed (tests/data/README.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

KEEP = {"/models": ["get"], "/models/{model}": ["get"], "/completions": ["post"], "/chat/completions": ["post"]}

# ---- ADDED BY MOEKIT: the error answers moekit documents (moekit/serve/errors.py, openapi.py) ----------------
MOEKIT_ERROR = {
    "description": "ADDED BY MOEKIT (not in OpenAI's document): an error in OpenAI's shape, "
                   '{"error": {message, type, param, code}}, as OpenAI sends it',
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
}
MOEKIT_ERRORS = {  # status -> when moekit answers it
    "/models": {"401": "a missing or wrong API key", "503": "the model is loading or the server is draining"},
    "/models/{model}": {"401": "a missing or wrong API key", "404": "an unknown model",
                        "503": "the model is loading or the server is draining"},
    "/completions": {"400": "a bad or unsupported parameter (the message and `param` name it)",
                     "401": "a missing or wrong API key", "404": "an unknown model",
                     "413": "the body is larger than --max-body-bytes", "503": "loading or draining"},
}
MOEKIT_ERRORS["/chat/completions"] = MOEKIT_ERRORS["/completions"]


def moekit_streams(paths: dict, schemas: dict) -> None:
    """Event streams, described so that a validator reads each event's `data` as the JSON chunk it carries.

    OpenAI's document (OpenAPI 3.1) puts the chat chunk schema as the `schema` of text/event-stream, which OpenAPI
    3.2 and schemathesis read as the schema of each event object {data, event, id}; here it becomes 3.2's
    `itemSchema` with `data` a JSON string of that chunk (`contentSchema`), or OpenAI's terminator `[DONE]`.
    /completions documents no stream at all; its chunks are OpenAI's CreateCompletionResponse ("both the streamed
    and non-streamed response objects share the same shape") except that, as OpenAI's and vLLM's servers send
    them, finish_reason is null until a choice's last chunk and usage null but in the last (include_usage)."""
    def sse(ref: str) -> dict:
        data = {"if": {"const": "[DONE]"},
                "else": {"contentMediaType": "application/json", "contentSchema": {"$ref": ref}}}
        return {"itemSchema": {"type": "object", "required": ["data"], "properties": {"data": data}},
                "x-moekit": "ADDED BY MOEKIT: the event stream's chunks (tests/data/extract_openai_openapi.py)"}

    # echo + logprobs: the first prompt token has no logprob; OpenAI's API sends null there (and lm-evaluation-harness
    # reads it so), as vLLM does, though OpenAI's document types the items as numbers and objects only
    logprobs = schemas["CreateCompletionResponse"]["properties"]["choices"]["items"]["properties"]["logprobs"]
    legacy = logprobs["anyOf"][0]["properties"]
    legacy["token_logprobs"]["items"] = {"type": ["number", "null"]}
    legacy["top_logprobs"]["items"] = {"anyOf": [legacy["top_logprobs"]["items"], {"type": "null"}]}
    logprobs["description"] = "ADDED BY MOEKIT: token_logprobs and top_logprobs items may be null (echo)"
    chunk = json.loads(json.dumps(schemas["CreateCompletionResponse"]))
    reason = chunk["properties"]["choices"]["items"]["properties"]["finish_reason"]
    reason["enum"] = [*reason["enum"], None]
    reason["type"] = ["string", "null"]
    chunk["properties"]["usage"] = {"anyOf": [chunk["properties"]["usage"], {"type": "null"}]}
    chunk["description"] = "ADDED BY MOEKIT: a chunk of a /completions stream (see moekit_streams)"
    schemas["MoekitCompletionStreamChunk"] = chunk
    paths["/chat/completions"]["post"]["responses"]["200"]["content"]["text/event-stream"] = sse(
        "#/components/schemas/CreateChatCompletionStreamResponse")
    paths["/completions"]["post"]["responses"]["200"]["content"]["text/event-stream"] = sse(
        "#/components/schemas/MoekitCompletionStreamChunk")
# ---- end of what moekit adds ----------------------------------------------------------------------------------


def refs(obj, out: set[str]) -> set[str]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "$ref" and isinstance(v, str):
                out.add(v)
            else:
                refs(v, out)
    elif isinstance(obj, list):
        for v in obj:
            refs(v, out)
    return out


def strip_meta(obj):
    if isinstance(obj, dict):
        return {k: strip_meta(v) for k, v in obj.items() if k != "x-oaiMeta"}
    if isinstance(obj, list):
        return [strip_meta(v) for v in obj]
    return obj


def extract(doc: dict, commit: str | None) -> dict:
    paths = {p: {m: strip_meta(doc["paths"][p][m]) for m in methods} for p, methods in KEEP.items()}
    for p, errors in MOEKIT_ERRORS.items():
        for op in paths[p].values():
            for status, when in errors.items():
                op["responses"].setdefault(status, {"$ref": "#/components/responses/MoekitError",
                                                    "description": f"ADDED BY MOEKIT: {when}"})
    out: dict = {"components": {"responses": {"MoekitError": MOEKIT_ERROR}}}
    todo, seen = refs(paths, set()) | {"#/components/schemas/ErrorResponse"}, set()
    while todo:
        ref = todo.pop()
        if ref in seen or ref == "#/components/responses/MoekitError":
            continue
        seen.add(ref)
        _, section, kind, name = ref.split("/")
        node = strip_meta(doc[section][kind][name])
        out[section].setdefault(kind, {})[name] = node
        todo |= refs(node, set()) - seen
    moekit_streams(paths, out["components"]["schemas"])
    source = "https://github.com/openai/openai-openapi" + (f" at {commit}" if commit else "")
    info = {**doc["info"], "description": f"A subset of OpenAI's OpenAPI document ({source}; MIT license), "
                                          "cut by tests/data/extract_openai_openapi.py for moekit's schema fuzzer."}
    return {"openapi": doc["openapi"], "info": info, "servers": [{"url": "/v1"}], "security": doc["security"],
            "paths": paths, "components": {k: dict(sorted(v.items())) for k, v in sorted(out["components"].items())}
            | {"securitySchemes": {"ApiKeyAuth": doc["components"]["securitySchemes"]["ApiKeyAuth"]}}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", type=Path, help="openapi.json of github.com/openai/openai-openapi")
    p.add_argument("out", type=Path)
    p.add_argument("--commit", help="the source's commit, recorded in info.description")
    a = p.parse_args()
    doc = extract(json.loads(a.source.read_text()), a.commit)
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(a.out)
    print(f"{a.out}: {len(doc['paths'])} paths, {len(doc['components']['schemas'])} schemas, "
          f"{a.out.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
