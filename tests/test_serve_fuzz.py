"""A property-based fuzzer driven by OpenAI's own OpenAPI document, against `moekit serve` on loopback.

schemathesis reads tests/data/openai_openapi.json (OpenAI's document cut to the four operations moekit
serves; moekit's additions, its error answers and how streams are read, are in one marked place:
tests/data/README.md) and, from a fixed
seed, sends each operation the document's examples, its boundary and wrong-type cases ("coverage") and
generated requests, valid ("positive") and invalid ("negative"). Every response is checked: no 5xx, a
documented status, the documented content type and schema (the JSON body, or each event of a stream),
invalid data refused, a missing key refused (401), wrong methods answered 405 with Allow.

A request valid under OpenAI's schema may still get a 400 where moekit does not implement what it asks
(tools, audio, logit_bias keys that are no token ids of this model...): that is the honest answer, so
such a 400 is accepted, but only when its error names a parameter and reason listed in REFUSALS; any
other 400 to a valid request fails the test. The model's name is set to the served one ("tiny") in every
body, so that the requests reach the parameters instead of stopping at "unknown model".
"""

import os
import re

import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis.core.failures import AcceptedNegativeData
from schemathesis.specs.openapi.checks import negative_data_rejection
from test_serve_utils import API_KEY, ServerProcess, write_run

from moekit.serve.openapi import ChatCompletionRequest, CompletionRequest
from moekit.serve.protocol import MAX_STOP

DOC = __file__.rsplit("/", 1)[0] + "/data/openai_openapi.json"
# Generated requests per operation and mode (plus the examples and coverage phases), and the seed; a deeper run:
# MOEKIT_FUZZ_EXAMPLES=1000 MOEKIT_FUZZ_SEED=7 pytest tests/test_serve_fuzz.py
EXAMPLES = int(os.environ.get("MOEKIT_FUZZ_EXAMPLES", "60"))

CONFIG = schemathesis.Config.from_dict({
    "seed": int(os.environ.get("MOEKIT_FUZZ_SEED", "0")),
    "generation": {"max-examples": EXAMPLES, "deterministic": True, "database": "none"},  # same seed, same run
    "auth": {"openapi": {"ApiKeyAuth": {"bearer": API_KEY}}},  # the server's key (the `ignored_auth` check drops it)
    # a documented 400 (see REFUSALS) or an unknown model id in GET /models/{model} is a valid request's answer
    "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "400", "404"]}},
})
schema = schemathesis.openapi.from_path(DOC, config=CONFIG)

# (param, message, why): the 400s moekit gives to requests that OpenAI's schema allows. Regular expressions,
# matched against the error's `param` (whole) and `message` (a search).
REFUSALS = [
    (r"tools.*|tool_choice|parallel_tool_calls|functions|function_call|messages\[\d+\]\.tool_calls.*", ".",
     "tool calls: function tools only, for a model whose chat template defines them"),
    (r"audio|prediction|modalities", "is not supported", "no audio, no predicted outputs"),
    (r"response_format.*", ".", "structured output: a schema the grammar engine cannot compile"),
    ("suffix", "is not supported", "no insertion"),
    (r"messages\[\d+\]\.role", "must be one of", "the deprecated `function` role"),
    (r"messages\[\d+\]\.content\[\d+\](\.image_url)?", "must be a text part|does not take images",
     "image, audio, file and refusal parts: the served model reads text"),
    ("prompt", "prompt is missing", "a null prompt (OpenAI: <|endoftext|>; moekit and vLLM need one)"),
    ("prompt", "prompt must be a string", "an empty array of prompts"),
    ("prompt|stop_token_ids", "which is not a token id of this model", "ids beyond the served vocabulary (97)"),
    ("logit_bias", r"which is not a token id of this model|must be a number in \[-100, 100\]",
     "keys that are no token ids of this model; biases beyond [-100, 100] (the range OpenAI's prose states)"),
    ("prompt|messages|max_tokens", "maximum context length", "longer than the served context (128 tokens)"),
    ("max_tokens|max_completion_tokens", "must be an integer >= ", "no output tokens in chat, or negative ones"),
    ("stream_options", "only allowed when stream is true", "OpenAI refuses it too"),
    ("top_logprobs", "needs logprobs: true", "OpenAI refuses it too"),
    ("top_p", r"top_p must be a number in \(0, 1\]", "top_p 0 (vLLM too needs > 0)"),
    ("best_of", "best_of must equal n", "no best-of ranking"),
    ("seed", r"seed must be an integer in \[0,", "negative seeds"),
    ("stop", f"at most {MAX_STOP} non-empty strings", "an empty stop string"),
    ("n", "choices per request", "n x prompts beyond --max-n"),
]


def documented_refusal(ctx, response, case) -> None:
    """A valid request's 400 must be one of REFUSALS (schemathesis check)."""
    if response.status_code != 400 or case.meta is None or case.meta.generation.mode.is_negative:
        return
    err = response.json()["error"]
    param, message = err.get("param") or "", err.get("message") or ""
    if not any(re.fullmatch(p, param) and re.search(m, message) for p, m, _ in REFUSALS):
        raise AssertionError(f"a request valid under OpenAI's schema got an undocumented 400: {err}")


def _property_names(schema) -> set[str]:
    if isinstance(schema, dict):
        names = set(schema.get("properties", {}))
        return names.union(*(_property_names(v) for v in schema.values()))
    if isinstance(schema, list):
        return set().union(*(_property_names(v) for v in schema))
    return set()


# Every request field moekit reads, at any depth: moekit/serve/openapi.py's models document them.
READ = set().union(*(_property_names(m.model_json_schema()) for m in (CompletionRequest, ChatCompletionRequest)))


def negative_data_refused(ctx, response, case) -> None:
    """schemathesis' negative_data_rejection, except where every invalid value lies in a field moekit does not
    read: moekit ignores unknown fields (protocol.py, as vLLM does), so OpenAI's `web_search_options` with a
    wrong type is ignored like any other field it does not know."""
    try:
        negative_data_rejection(ctx, response, case)
    except AcceptedNegativeData:
        data = case.meta.phase.data
        pointers = [m.schema_pointer for m in getattr(data, "mutations", ())]
        pointers = pointers or ([data.location] if getattr(data, "location", None) else [])
        unread = [any(name not in READ for name in re.findall(r"/properties/([^/]+)", p)) for p in pointers]
        if not unread or not all(unread):
            raise


@schema.hook
def flatmap_path_parameters(ctx, params):
    """GET /models/{model}: the served model's id as often as a generated one."""
    if not params or "model" not in params:
        return st.just(params)
    return st.sampled_from([params, {**params, "model": "tiny"}])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_fuzz")
    write_run(d / "run", seed=5)
    s = ServerProcess(d / "run", d / "server.log", "--api-key", API_KEY, "--max-tokens-default", "8")
    yield s
    assert s.stop() == 0, s.output()


@schema.parametrize()
def test_openai_schema(case, server):
    checks = [documented_refusal, negative_data_refused]
    if isinstance(case.body, dict):
        if isinstance(case.body.get("model"), str):
            case.body["model"] = "tiny"
        elif case.body.get("model") is None:  # by design, moekit (as vLLM) serves its model when none is named
            checks.remove(negative_data_refused)
    case.call_and_validate(base_url=server.base_url, additional_checks=checks,
                           excluded_checks=[negative_data_rejection])


# Valid requests that the generator rarely composes (every field right at once): streams, logprobs, echo, n.
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
GOOD = {
    "chat": ("/chat/completions", {"messages": CHAT, "max_tokens": 4, "n": 2, "seed": 1}),
    "chat logprobs": ("/chat/completions", {"messages": CHAT, "max_completion_tokens": 4, "logprobs": True,
                                            "top_logprobs": 3}),
    "chat stream": ("/chat/completions", {"messages": CHAT, "max_tokens": 4, "stream": True, "n": 2,
                                          "stream_options": {"include_usage": True}, "logprobs": True,
                                          "top_logprobs": 1}),
    "completion": ("/completions", {"prompt": ["a", "b"], "max_tokens": 4, "stop": ["\n"], "temperature": 0}),
    "completion echo logprobs": ("/completions", {"prompt": "def f(x):", "max_tokens": 3, "echo": True,
                                                  "logprobs": 2}),
    "completion prompt logprobs only": ("/completions", {"prompt": [5, 6, 7], "max_tokens": 0, "echo": True,
                                                         "logprobs": 1}),
    "completion stream": ("/completions", {"prompt": "x", "max_tokens": 4, "stream": True, "logprobs": 1,
                                           "stream_options": {"include_usage": True}}),
}


@pytest.mark.parametrize("name", list(GOOD))
def test_valid_requests_conform_to_openai_schema(server, name):
    path, body = GOOD[name]
    case = schema[path]["POST"].Case(body={"model": "tiny", **body}, media_type="application/json")
    response = case.call_and_validate(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 200
    stream = body.get("stream", False)
    assert response.headers["content-type"][0].startswith("text/event-stream" if stream else "application/json")
    if stream:
        assert response.text.rstrip().endswith("data: [DONE]") and response.text.count("data: ") > 2
