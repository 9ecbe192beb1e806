"""Tool calls (moekit/serve/tools.py): request parsing, the constrained schemas, the output parsers of the three
formats, and the template's view of earlier calls. The server's side is in test_serve_tools_api.py."""

import json

import pytest

from moekit.serve import tools
from moekit.serve.chat import ChatTemplate
from moekit.serve.errors import APIError

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}

# A Hermes/Qwen-style template, cut down: tools in a system turn, calls in <tool_call> tags.
HERMES = """{%- if tools %}<|im_start|>system
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Call a function with <tool_call>{"name": ..., "arguments": ...}</tool_call>.<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant
{%- for tc in m.tool_calls %}
<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response id="{{ m.tool_call_id }}">{{ m.content }}</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def bad(body: dict, param: str, words: str) -> None:
    with pytest.raises(APIError) as e:
        tools.parse_tools(body)
    assert e.value.status == 400 and e.value.param == param and words in e.value.message, e.value.message


def test_parse_tools_and_tool_choice():
    assert tools.parse_tools({}) is None and tools.parse_tools({"tools": [], "tool_choice": "none"}) is None
    spec = tools.parse_tools({"tools": [WEATHER, TIME]})
    assert spec.choice == "auto" and [t["function"]["name"] for t in spec.tools] == ["get_weather", "get_time"]
    assert spec.tools[1]["function"]["parameters"] == {"type": "object", "properties": {}}
    named = tools.parse_tools({"tools": [WEATHER, TIME], "tool_choice": {"type": "function",
                                                                         "function": {"name": "get_time"}}})
    assert named.choice == "function" and named.name == "get_time"
    assert named.schema() == {"type": "object", "properties": {}}
    assert tools.parse_tools({"tools": [WEATHER], "tool_choice": "none"}).schema() is None
    bad({"tool_choice": "required"}, "tool_choice", "needs tools")
    bad({"tools": {"a": 1}}, "tools", "must be an array")
    bad({"tools": [{"type": "retrieval"}]}, "tools[0]", '"type": "function"')
    bad({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name", "1-64")
    bad({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
        "tools[0].function.parameters", "JSON schema object")
    bad({"tools": [WEATHER, WEATHER]}, "tools", "two functions named")
    bad({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice", '"none", "auto", "required"')
    bad({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
        "not in tools")


def test_required_schema_is_an_array_of_calls_to_the_given_tools():
    pytest.importorskip("jsonschema")
    import jsonschema

    schema = tools.parse_tools({"tools": [WEATHER, TIME], "tool_choice": "required"}).schema()
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "get_time",
                                                                                    "parameters": {}}], schema)
    for wrong in ([], [{"name": "get_weather", "parameters": {}}], [{"name": "rm_rf", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)


def test_output_parsers_find_calls_in_each_format():
    calls, rest = tools.parse_output("hermes", 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": '
                                     '{"city": "Oslo"}}\n</tool_call>\n<tool_call>{"name": "get_time"}</tool_call>')
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"] and rest == "Let me look."
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert calls[1]["function"]["arguments"] == "{}"
    assert calls[0]["id"].startswith("call_") and calls[0]["id"] != calls[1]["id"] and calls[0]["type"] == "function"
    calls, rest = tools.parse_output("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}]')
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Rome"} and rest is None
    calls, rest = tools.parse_output("llama3_json", '<|python_tag|>{"name": "get_time", "parameters": {}}')
    assert calls[0]["function"]["name"] == "get_time" and rest is None
    for parser, text in [("hermes", "It is sunny."), ("hermes", "<tool_call>{not json}</tool_call>"),
                         ("mistral", "[TOOL_CALLS] oops"), ("llama3_json", '{"name": "f"} and more'),
                         ("llama3_json", "Plain words.")]:
        assert tools.parse_output(parser, text) == ([], text)  # words are an answer, not an error
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        tools.parse_output("nope", "x")


def test_finish_turns_outputs_into_messages():
    auto = tools.parse_tools({"tools": [WEATHER]})
    msg, reason = tools.finish(auto, "hermes", '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>',
                               "stop")
    assert reason == "tool_calls" and msg["content"] is None and len(msg["tool_calls"]) == 1
    assert tools.finish(auto, "hermes", "Sunny.", "stop") == ({"content": "Sunny."}, "stop")
    assert tools.finish(auto, None, '<tool_call>{"name": "get_weather"}</tool_call>', "stop")[1] == "stop"
    named = tools.parse_tools({"tools": [WEATHER], "tool_choice": {"type": "function",
                                                                    "function": {"name": "get_weather"}}})
    msg, reason = tools.finish(named, "hermes", '{"city": "Oslo"}', "stop")
    assert reason == "stop" and msg["tool_calls"][0]["function"] == {"name": "get_weather",
                                                                      "arguments": '{"city": "Oslo"}'}
    required = tools.parse_tools({"tools": [WEATHER], "tool_choice": "required"})
    msg, reason = tools.finish(required, None, '[{"name": "get_weather", "parameters": {"city": "Oslo"}}]', "stop")
    assert reason == "tool_calls" and json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"city": "Oslo"}
    assert tools.finish(required, None, '[{"name": "get_wea', "length") == ({"content": '[{"name": "get_wea'},
                                                                             "length")


def test_the_template_sees_tools_and_earlier_calls():
    assert tools.defines_tools(HERMES) and not tools.defines_tools(None) and not tools.defines_tools("{{ x }}")
    assert tools.detect_parser(HERMES) == "hermes" and tools.detect_parser("[TOOL_CALLS]") == "mistral"
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": "", **tools.template_message(
                    {"role": "assistant", "tool_calls": [call]}, "messages[1]")},
                {"role": "tool", "content": "12 C", **tools.template_message(
                    {"role": "tool", "tool_call_id": "call_1"}, "messages[2]")}]
    prompt = ChatTemplate(HERMES).render(messages, tools=[WEATHER])
    assert '"name": "get_weather"' in prompt.split("</tools>")[0]  # the tool list
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in prompt
    assert '<tool_response id="call_1">12 C</tool_response>' in prompt
    with pytest.raises(ValueError, match="default chat template has no tool calls"):
        ChatTemplate().render(messages[:1], tools=[WEATHER])
    for m, param, words in [({"role": "user", "tool_calls": []}, "messages[0].tool_calls", "on an assistant"),
                            ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]},
                             "messages[0].tool_calls[0].function.arguments", "not JSON"),
                            ({"role": "tool", "content": "x"}, "messages[0].tool_call_id", "the id of the call")]:
        with pytest.raises(APIError) as e:
            tools.template_message(m, "messages[0]")
        assert e.value.param == param and words in e.value.message
