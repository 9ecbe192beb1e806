"""Tool calls: OpenAI's `tools` and `tool_choice` for models whose chat template defines them.

    spec = parse_tools(body)                          # None without tools; a 400 for a malformed one
    template.check_tools()                            # a 400 when the model's template has no tool calls
    calls, content = parser_for(template.source).parse(text)     # "auto": the model's own format

How a request goes (vLLM's way, `vllm/entrypoints/openai/serving_chat.py` and `tool_parsers/`):
- The tools go into the prompt through the chat template (Hugging Face `apply_chat_template(tools=...)`: the
  template sees `tools`, the list of `{"type": "function", "function": {name, description, parameters}}`). A
  template that never reads `tools` (moekit's plain-text default among them) cannot call tools: 400.
- `tool_choice` "auto" (the default with tools): the model writes whatever it likes; a parser for the template's
  format finds the calls in the output. Formats: `hermes` (`<tool_call>{"name": ..., "arguments": {...}}
  </tool_call>`: Hermes, Qwen 2/2.5/3), `mistral` (`[TOOL_CALLS][{"name": ..., "arguments": {...}}]`), `llama3_json`
  (the whole output one `{"name": ..., "parameters": {...}}` object, Llama 3.1+); picked from the template's text
  unless `--tool-call-parser` says.
- "required" and a named function: the output is constrained by a JSON schema (structured output) instead of
  parsed: a named function's output is its arguments object; "required" writes a JSON array of
  `{"name", "parameters"}` items, one per call, each a choice among the tools. Both are turned into `tool_calls`.
- "none": the template still sees the tools (vLLM's default); nothing is parsed.
Earlier turns' `tool_calls` reach the template with `arguments` decoded from their JSON string to an object, as
templates expect (vLLM does the same), and `tool` messages keep their `tool_call_id`.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from moekit.serve.errors import bad_request, show

PARSERS = ("hermes", "mistral", "llama3_json")
NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI: a-z, A-Z, 0-9, underscores and dashes, at most 64


@dataclass
class ToolSpec:
    tools: list[dict]  # as the template sees them: {"type": "function", "function": {...}}
    choice: str  # "none" | "auto" | "required" | "function" (a named one)
    name: str | None = None  # the named function

    def function(self, name: str) -> dict:
        return next(t["function"] for t in self.tools if t["function"]["name"] == name)

    def schema(self) -> dict | None:
        """The JSON schema the output must follow ("required", named), else None (vLLM's `_get_json_schema`)."""
        if self.choice == "function":
            return self.function(self.name).get("parameters") or {"type": "object"}
        if self.choice != "required":
            return None
        items = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                                   "parameters": t["function"].get("parameters") or {"type": "object"}},
                  "required": ["name", "parameters"]} for t in self.tools]
        return {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}


def _function(t, p: str) -> dict:
    if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
        raise bad_request(f'{p} must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}, '
                          f"got {show(t)}", p)
    f = t["function"]
    name = f.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise bad_request(f"{p}.function.name must be 1-64 letters, digits, underscores or dashes, got {show(name)}",
                          f"{p}.function.name")
    params = f.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise bad_request(f"{p}.function.parameters must be a JSON schema object, got {show(params)}",
                          f"{p}.function.parameters")
    desc = f.get("description")
    if desc is not None and not isinstance(desc, str):
        raise bad_request(f"{p}.function.description must be a string, got {show(desc)}", f"{p}.function.description")
    out = {"name": name, "parameters": params if params is not None else {"type": "object", "properties": {}}}
    if desc is not None:
        out["description"] = desc
    if f.get("strict") is not None:
        out["strict"] = bool(f["strict"])
    return {"type": "function", "function": out}


def parse_tools(body: dict) -> ToolSpec | None:
    """`tools` and `tool_choice` of a chat request; None when it has no tools (and tool_choice is absent or
    "none")."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise bad_request(f"tool_choice {show(choice)} needs tools: give the functions in tools", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise bad_request(f"tools must be an array of functions, got {show(tools)}", "tools")
    parsed = [_function(t, f"tools[{i}]") for i, t in enumerate(tools)]
    names = [t["function"]["name"] for t in parsed]
    if len(set(names)) != len(names):
        raise bad_request(f"tools has two functions named {show(next(n for n in names if names.count(n) > 1))}: "
                          "names must be unique", "tools")
    if choice is None:
        return ToolSpec(parsed, "auto")
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise bad_request(f'tool_choice must be "none", "auto", "required" or {{"type": "function", "function": '
                              f'{{"name": ...}}}}, got {show(choice)}', "tool_choice")
        return ToolSpec(parsed, choice)
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and isinstance(
        choice.get("function"), dict) and choice.get("type") == "function" else None
    if not isinstance(name, str):
        raise bad_request(f'tool_choice must be "none", "auto", "required" or {{"type": "function", "function": '
                          f'{{"name": ...}}}}, got {show(choice)}', "tool_choice")
    if name not in names:
        raise bad_request(f"tool_choice names the function {show(name)}, which is not in tools ({', '.join(names)})",
                          "tool_choice")
    return ToolSpec(parsed, "function", name)


def template_message(m: dict, p: str) -> dict:
    """An assistant message's `tool_calls` or a tool message's `tool_call_id`, as a chat template reads them:
    {"tool_calls": [...], "tool_call_id": ...} to merge into the normalized message; a 400 when malformed."""
    out = {}
    if m.get("tool_calls") is not None:
        if m.get("role") != "assistant" or not isinstance(m["tool_calls"], list):
            raise bad_request(f"{p}.tool_calls must be an array, on an assistant message", f"{p}.tool_calls")
        calls = []
        for j, c in enumerate(m["tool_calls"]):
            q = f"{p}.tool_calls[{j}]"
            f = c.get("function") if isinstance(c, dict) else None
            if not isinstance(f, dict) or not isinstance(f.get("name"), str):
                raise bad_request(f'{q} must be {{"id", "type": "function", "function": {{"name", "arguments"}}}}, '
                                  f"got {show(c)}", q)
            args = f.get("arguments", "{}")
            try:
                args = json.loads(args) if isinstance(args, str) else args
            except json.JSONDecodeError as e:
                raise bad_request(f"{q}.function.arguments is not JSON ({e.msg}): send the arguments as a JSON "
                                  "object in a string", f"{q}.function.arguments") from None
            calls.append({"id": c.get("id", ""), "type": "function",
                          "function": {"name": f["name"], "arguments": args}})
        out["tool_calls"] = calls
    if m.get("role") == "tool":
        tid = m.get("tool_call_id")
        if not isinstance(tid, str):
            raise bad_request(f"{p}.tool_call_id must be the id of the call this message answers, got {show(tid)}",
                              f"{p}.tool_call_id")
        out["tool_call_id"] = tid
    return out


def defines_tools(template_source: str | None) -> bool:
    """Whether a chat template reads `tools` (the Jinja name Hugging Face passes them as)."""
    return bool(template_source) and re.search(r"\btools\b", template_source) is not None


def detect_parser(template_source: str | None) -> str | None:
    """The output format a template teaches, from its text (None: none recognized; --tool-call-parser names it)."""
    if not template_source:
        return None
    if "<tool_call>" in template_source:
        return "hermes"
    if "[TOOL_CALLS]" in template_source:
        return "mistral"
    if "<|python_tag|>" in template_source or '"parameters"' in template_source or "ipython" in template_source:
        return "llama3_json"
    return None


def new_call(name: str, arguments) -> dict:
    """One OpenAI tool call; `arguments` as the JSON string OpenAI sends."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": text}}


def _call_of(obj, key: str = "arguments") -> dict | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(key, obj.get("parameters" if key == "arguments" else "arguments", {}))
    return new_call(obj["name"], args if args is not None else {})


def parse_output(parser: str, text: str) -> tuple[list[dict], str | None]:
    """(tool calls, remaining content or None) of a model's output in `parser`'s format; no calls, the text
    unchanged, when it holds none that parse (a model that answers in words is not an error)."""
    if parser == "hermes":
        calls, spans = [], []
        for m in re.finditer(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.S):
            try:
                call = _call_of(json.loads(m.group(1)))
            except json.JSONDecodeError:
                call = None
            if call is not None:
                calls.append(call)
                spans.append(m.span())
        if not calls:
            return [], text
        rest = text[:spans[0][0]].strip()
        return calls, rest or None
    if parser == "mistral":
        head, sep, tail = text.partition("[TOOL_CALLS]")
        if not sep:
            return [], text
        try:
            obj, _ = json.JSONDecoder().raw_decode(tail.strip())
        except json.JSONDecodeError:
            return [], text
        objs = obj if isinstance(obj, list) else [obj]
        calls = [c for c in (_call_of(o) for o in objs) if c is not None]
        return (calls, head.strip() or None) if calls else ([], text)
    if parser == "llama3_json":
        s = text.strip().removeprefix("<|python_tag|>").strip()
        try:
            obj, end = json.JSONDecoder().raw_decode(s)
        except json.JSONDecodeError:
            return [], text
        call = _call_of(obj, "parameters")
        return ([call], None) if call is not None and not s[end:].strip() else ([], text)
    raise ValueError(f"unknown tool-call parser {parser!r}: one of {', '.join(PARSERS)}")


def constrained_calls(spec: ToolSpec, text: str) -> list[dict]:
    """The calls of an output written under `spec.schema()` ("required": a JSON array of {name, parameters};
    named: the function's arguments)."""
    if spec.choice == "function":
        return [new_call(spec.name, text)]
    return [new_call(item["name"], item["parameters"]) for item in json.loads(text)]


def finish(spec: ToolSpec, parser: str | None, text: str, reason: str) -> tuple[dict, str]:
    """The assistant message's fields ({"content", "tool_calls"?}) and finish reason for a finished output: calls
    found (auto, with a parser; required) finish with "tool_calls", a named function's with "stop" (OpenAI's and
    vLLM's rule); an output cut by max_tokens keeps "length", and under "required" it stays text (a cut JSON array
    names no whole call)."""
    if spec.choice == "function":
        return {"content": None, "tool_calls": [new_call(spec.name, text)]}, reason
    if spec.choice == "required":
        try:
            return {"content": None, "tool_calls": constrained_calls(spec, text)}, "tool_calls"
        except (json.JSONDecodeError, KeyError, TypeError):
            return {"content": text}, reason
    if spec.choice == "auto" and parser is not None:
        calls, rest = parse_output(parser, text)
        if calls:
            return {"content": rest, "tool_calls": calls}, "tool_calls"
    return {"content": text}, reason
