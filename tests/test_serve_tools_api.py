"""Tool calls through the server and the official `openai` client: a template that defines them (Hermes style),
tool_choice named / required (constrained: the arguments validate against the function's schema), auto (the
model's own words stay content), earlier calls in the conversation, streaming, and the 400s."""

import json

import openai
import pytest
from test_serve_tools import HERMES, TIME, WEATHER
from test_serve_utils import InProcessServer, tiny_engine

from moekit.serve.chat import ChatTemplate

jsonschema = pytest.importorskip("jsonschema")

# Bounded, so that a random model's arguments end well within max_tokens.
CITY = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"]}}}
ASK = [{"role": "user", "content": "Weather in Oslo?"}]


@pytest.fixture(scope="module")
def client():
    with InProcessServer(lambda: tiny_engine(max_seq_len=2048), template=ChatTemplate(HERMES, "test")) as s:
        s.wait_ready()
        yield openai.OpenAI(base_url=s.base_url, api_key="-", max_retries=0, timeout=60)


def test_a_named_function_is_called_with_arguments_that_follow_its_schema(client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    for seed in range(4):
        r = client.chat.completions.create(model="tiny", messages=ASK, tools=[CITY, TIME], tool_choice=choice,
                                           temperature=1, seed=seed, max_tokens=300)
        c = r.choices[0]
        assert c.finish_reason == "stop" and c.message.content is None and len(c.message.tool_calls) == 1
        call = c.message.tool_calls[0]
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), CITY["function"]["parameters"])


def test_required_calls_one_or_more_of_the_tools(client):
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=[CITY, TIME], tool_choice="required",
                                       temperature=0, max_tokens=400)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls
    schemas = {"get_weather": CITY["function"]["parameters"], "get_time": TIME["function"]["parameters"]}
    for call in c.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_streamed_tool_calls_equal_the_whole_response(client):
    kw = dict(model="tiny", messages=ASK, tools=[CITY], temperature=0, max_tokens=300,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = client.chat.completions.create(**kw).choices[0]
    calls, reasons = [], []
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            calls += ch.delta.tool_calls or []
            reasons.append(ch.finish_reason)
    assert [c.function.name for c in calls] == ["get_weather"] and reasons[-1] == "stop"
    assert calls[0].function.arguments == whole.message.tool_calls[0].function.arguments


def test_auto_leaves_an_answer_in_words_as_content_and_takes_earlier_calls(client):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Oslo", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12 C, rain"}]
    short = client.chat.completions.create(model="tiny", messages=ASK, tools=[CITY], max_tokens=8, temperature=0)
    r = client.chat.completions.create(model="tiny", messages=history, tools=[CITY], max_tokens=8, temperature=0)
    c = r.choices[0]
    # A random model writes no <tool_call> tags: its words are the answer (a parse failure is not an error).
    assert c.message.tool_calls is None and isinstance(c.message.content, str) and c.finish_reason == "length"
    assert r.usage.prompt_tokens > short.usage.prompt_tokens + len('<tool_call>{"name": "get_weather"}')
    none = client.chat.completions.create(model="tiny", messages=ASK, tools=[CITY], tool_choice="none",
                                          max_tokens=4, temperature=0)
    assert none.choices[0].message.tool_calls is None and none.usage.prompt_tokens == short.usage.prompt_tokens


def test_bad_tool_requests_are_400s(client):
    cases = [
        (dict(tools=[CITY], tool_choice="required", response_format={"type": "json_object"}), "tool_choice",
         "drop response_format"),
        (dict(tools=[CITY], tool_choice={"type": "function", "function": {"name": "get_time"}}), "tool_choice",
         "not in tools"),
        (dict(tools=[{"type": "function", "function": {"name": "bad name"}}]), "tools[0].function.name", "1-64"),
        (dict(tool_choice="auto"), "tool_choice", "needs tools"),
        (dict(messages=[{"role": "tool", "content": "12 C"}]), "messages[0].tool_call_id", "the id of the call"),
    ]
    for kw, param, words in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**{"model": "tiny", "messages": ASK, "max_tokens": 4, **kw})
        assert e.value.param == param and words in e.value.message, (kw, e.value.message)


def test_a_template_without_tool_calls_is_a_clear_400():
    with InProcessServer(tiny_engine) as s:  # moekit's plain-text default template
        s.wait_ready()
        client = openai.OpenAI(base_url=s.base_url, api_key="-", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], max_tokens=4)
        assert e.value.param == "tools" and "does not define tool calls" in e.value.message
        ok = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=4)  # without tools: fine
        assert ok.choices[0].message.tool_calls is None
