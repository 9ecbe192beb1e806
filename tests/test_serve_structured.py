"""Structured output and logit_bias through `moekit serve`, as clients send them: OpenAI's `response_format`
(json_schema, json_object; the official client's `chat.completions.parse` with a Pydantic model), vLLM's
`guided_json` / `guided_regex` / `guided_choice` / `structured_outputs`, streaming, and the 400s for what cannot be
served.

One server subprocess serves the module: conftest's tiny random model (512-token context) with the ASCII character
tokenizer; the schemas bound their strings, integers and arrays, so that a random model's outputs end (see
test_infer_grammar.py).
"""

import json
import re
from typing import Annotated, Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from test_infer_grammar import SCHEMA
from test_serve_utils import API_KEY, ServerProcess, encode, request, write_run

MAX_TOKENS = 400


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_structured")
    write_run(d / "run", seed=3, max_seq_len=512)
    server = ServerProcess(d / "run", d / "server.log", "--api-key", API_KEY)
    yield server
    assert server.stop() == 0, server.output()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120)


def schema_format(schema: dict = SCHEMA) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def test_chat_json_schema_sampled_choices_all_validate(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "A person, as JSON"}],
                                       max_tokens=MAX_TOKENS, temperature=1.0, n=16, seed=1,
                                       response_format=schema_format())
    assert len(r.choices) == 16
    for ch in r.choices:
        assert ch.finish_reason == "stop"
        jsonschema.validate(json.loads(ch.message.content), SCHEMA)
    assert len({ch.message.content for ch in r.choices}) > 8  # sampled, each choice its own


def test_completions_take_response_format_and_vllm_spellings(client):
    def complete(**kw):
        return client.completions.create(model="tiny", prompt="Answer: ", max_tokens=MAX_TOKENS, temperature=0, **kw)

    obj = complete(extra_body={"response_format": {"type": "json_object"}}).choices[0]
    assert obj.finish_reason == "stop" and isinstance(json.loads(obj.text), dict)
    guided = complete(extra_body={"guided_json": SCHEMA}).choices[0].text
    assert guided == complete(extra_body={"response_format": schema_format()}).choices[0].text
    jsonschema.validate(json.loads(guided), SCHEMA)
    assert complete(extra_body={"guided_json": json.dumps(SCHEMA)}).choices[0].text == guided  # schema as text
    choices = ["positive", "negative", "neutral"]
    assert complete(extra_body={"guided_choice": choices}).choices[0].text in choices
    assert complete(extra_body={"structured_outputs": {"choice": choices}}).choices[0].text in choices
    date = r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"
    for extra in ({"guided_regex": date}, {"structured_outputs": {"regex": date}}):
        assert re.fullmatch(date, complete(extra_body=extra).choices[0].text)


def test_official_client_parse_with_a_pydantic_model(client):
    class Person(BaseModel):  # the client turns it into a strict json_schema and parses the answer back
        name: str = Field(max_length=8)
        age: int = Field(ge=0, le=150)
        color: Literal["red", "green", "blue"]
        tags: list[Annotated[str, Field(max_length=6)]] = Field(max_length=3)

    r = client.chat.completions.parse(model="tiny", messages=[{"role": "user", "content": "Who?"}],
                                      max_tokens=MAX_TOKENS, temperature=0.7, seed=3, response_format=Person)
    person = r.choices[0].message.parsed
    assert isinstance(person, Person) and 0 <= person.age <= 150 and len(person.tags) <= 3


def test_streamed_structured_output_equals_the_whole_answer(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=MAX_TOKENS, temperature=0,
              response_format=schema_format())
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole and chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(streamed), SCHEMA)


def test_logit_bias_on_both_endpoints(client):
    x = str(encode("x")[-1])
    c = client.completions.create(model="tiny", prompt="hello", max_tokens=5, temperature=0, logit_bias={x: 100})
    assert c.choices[0].text == "xxxxx"
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          temperature=0, logit_bias={x: 100})
    assert chat.choices[0].message.content == "xxxxx"


BAD = {  # extra body -> (param, words of the message)
    "unsupported schema type": ({"response_format": schema_format({"type": "strin"})},
                                "response_format.json_schema.schema", 'Unsupported type "strin"'),
    "dangling $ref": ({"response_format": schema_format({"$ref": "#/$defs/missing"})},
                      "response_format.json_schema.schema", "cannot be used for structured output"),
    "schema missing": ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
                       "response_format.json_schema.schema", "json_schema.schema is missing"),
    "json_schema without a name": ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
                                   "response_format.json_schema.name", "must be a non-empty string"),
    "unknown response_format type": ({"response_format": {"type": "yaml"}}, "response_format.type",
                                     "must be text, json_object or json_schema"),
    "lookbehind regex": ({"guided_regex": "(?<=a)b"}, "guided_regex", "Lookbehind is not supported"),
    "empty choice": ({"guided_choice": []}, "guided_choice", "non-empty array of strings"),
    "two constraints": ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex",
                        "one structured-output constraint per request"),
    "schema text that is not JSON": ({"guided_json": "{nope"}, "guided_json", "not JSON text"),
    "logit_bias id out of vocabulary": ({"logit_bias": {"97": 5}}, "logit_bias", "not a token id of this model"),
    "logit_bias not an id": ({"logit_bias": {"x": 5}}, "logit_bias", "not a token id of this model"),
    "logit_bias too large": ({"logit_bias": {"5": 101}}, "logit_bias", "must be a number in [-100, 100]"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_what_cannot_be_served_is_a_clear_400(client, case, endpoint):
    extra, param, words = BAD[case]
    with pytest.raises(openai.BadRequestError) as e:
        if endpoint == "chat":
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                           extra_body=extra)
        else:
            client.completions.create(model="tiny", prompt="hi", max_tokens=4, extra_body=extra)
    assert words in e.value.message and e.value.param == param and e.value.type == "invalid_request_error"


@pytest.mark.parametrize("extra, param, words", [
    ({"guided_choice": ["\ud800"]}, "guided_choice", "unpaired UTF-16 surrogate"),
    ({"guided_regex": "a\ud800"}, "guided_regex", "unpaired UTF-16 surrogate"),
    ({"guided_json": {"enum": ["\ud800"]}}, "guided_json", "Failed to parse JSON"),
    ({"logit_bias": {"\ud800": 1}}, "logit_bias", "not a token id of this model"),
])
def test_lone_surrogates_in_constraints_are_a_400(server, extra, param, words):
    # JSON lets a client send "\ud800" (the official client cannot, so raw HTTP); the message escapes it.
    body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 4, **extra}).encode()
    status, _, raw = request(server.port, "POST", "/v1/completions", body,
                             {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    err = json.loads(raw)["error"]
    assert status == 400 and words in err["message"] and err["param"] == param, raw
