"""Structured output and logit_bias in a request body -> `grammar.Constraint` and a token-id -> bias map.

    constraint = parse_constraint(body)          # None, or what the output must match; a 400 saying what is wrong
    bias = parse_logit_bias(body, vocab_size)    # {} or {token id: bias}

Both endpoints take every spelling their users send:
- OpenAI's `response_format`: `{"type": "text"}` (no constraint), `{"type": "json_object"}` (any JSON object) or
  `{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}` (API reference, "Structured
  Outputs"). The grammar is always strict, whatever `strict` says (vLLM does the same).
- vLLM's extra parameters (vllm/entrypoints/openai/protocol.py): `guided_json` (a schema, as an object or as JSON
  text), `guided_regex`, `guided_choice` (an array of strings), `guided_grammar` (EBNF, llama.cpp's GBNF syntax),
  and vLLM's newer spelling `structured_outputs: {"json" | "regex" | "choice" | "grammar" | "json_object": ...}`.
  `guided_decoding_backend` and `guided_whitespace_pattern` are ignored (one backend here: xgrammar).
One constraint per request: two are a 400 naming both. A constraint the grammar engine cannot compile (an
unsupported schema keyword, a regex with lookbehind, an EBNF syntax error) is a 400 that quotes its reason.

`logit_bias` is OpenAI's: an object from token ids (as strings, JSON keys always are) to numbers in [-100, 100],
added to the logits before sampling; an id outside the vocabulary is a 400.
"""

from __future__ import annotations

import json
import math

from moekit.infer import grammar
from moekit.infer.grammar import Constraint
from moekit.infer.sampler import MAX_LOGIT_BIAS
from moekit.serve.errors import bad_request, show

VLLM_NAMES = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
              "guided_grammar": "grammar"}
STRUCTURED_OUTPUTS_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                           "json_object": "json_object"}


def _schema(v, param: str) -> Constraint:
    """A JSON schema given as an object (or JSON text, as vLLM allows) -> its constraint, as ASCII JSON text (a
    lone surrogate stays an escape, which the schema parser then judges)."""
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError as e:
            raise bad_request(f"{param} is a string but not JSON text ({e.msg} at column {e.colno}): send the JSON "
                              "schema as an object", param) from None
    if not isinstance(v, (dict, bool)):
        raise bad_request(f"{param} must be a JSON schema (an object such as {{\"type\": \"object\"}}), got {show(v)}",
                          param)
    return Constraint("json_schema", json.dumps(v, ensure_ascii=True))


def _string(v, param: str, what: str) -> str:
    if not isinstance(v, str) or not v:
        raise bad_request(f"{param} must be a non-empty string ({what}), got {show(v)}", param)
    _valid_text(v, param)
    return v


def _valid_text(s: str, param: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"{param} contains an unpaired UTF-16 surrogate escape: send valid Unicode text",
                          param) from None


def _choice(v, param: str) -> Constraint:
    if not isinstance(v, list) or not v or any(not isinstance(c, str) for c in v):
        raise bad_request(f"{param} must be a non-empty array of strings (the output is one of them), got {show(v)}",
                          param)
    for c in v:
        _valid_text(c, param)
    return Constraint("choice", json.dumps(v, ensure_ascii=True))


def _make(kind: str, v, param: str) -> Constraint:
    if kind == "json_schema":
        return _schema(v, param)
    if kind == "regex":
        return Constraint("regex", _string(v, param, "a regular expression the whole output matches"))
    if kind == "choice":
        return _choice(v, param)
    if kind == "grammar":
        return Constraint("grammar", _string(v, param, "an EBNF grammar whose rule `root` the output matches"))
    return Constraint("json_object")


def _response_format(v) -> Constraint | None:
    p = "response_format"
    if not isinstance(v, dict):
        raise bad_request(f'{p} must be an object such as {{"type": "json_object"}}, got {show(v)}', p)
    kind = v.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_object")
    if kind != "json_schema":
        raise bad_request(f"{p}.type must be text, json_object or json_schema, got {show(kind)}", f"{p}.type")
    js = v.get("json_schema")
    if not isinstance(js, dict):
        raise bad_request(f'{p}.json_schema must be an object such as {{"name": "answer", "schema": {{...}}, '
                          f'"strict": true}}, got {show(js)}', f"{p}.json_schema")
    name = js.get("name")
    if not isinstance(name, str) or not name:
        raise bad_request(f"{p}.json_schema.name must be a non-empty string (the schema's name), got {show(name)}",
                          f"{p}.json_schema.name")
    if js.get("strict") not in (None, True, False):
        raise bad_request(f"{p}.json_schema.strict must be true or false, got {show(js.get('strict'))}",
                          f"{p}.json_schema.strict")
    if js.get("schema") is None:
        raise bad_request(f"{p}.json_schema.schema is missing: give the JSON schema the output must follow (or use "
                          '{"type": "json_object"} for any JSON object)', f"{p}.json_schema.schema")
    return _schema(js["schema"], f"{p}.json_schema.schema")


def parse_constraint(body: dict) -> Constraint | None:
    """The request's structured-output constraint, checked by the grammar engine; None when it has none."""
    found: list[tuple[str, Constraint]] = []
    if body.get("response_format") is not None:
        c = _response_format(body["response_format"])
        if c is not None:  # the param of a compile error: where the schema is
            found.append(("response_format" if c.kind == "json_object" else "response_format.json_schema.schema", c))
    for name, kind in VLLM_NAMES.items():
        if body.get(name) is not None:
            found.append((name, _make(kind, body[name], name)))
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise bad_request(f'structured_outputs must be an object such as {{"regex": "[0-9]+"}}, got {show(so)}',
                              "structured_outputs")
        for key, kind in STRUCTURED_OUTPUTS_KEYS.items():
            v = so.get(key)
            if v is None or (key == "json_object" and v is False):
                continue
            if key == "json_object" and v is not True:
                raise bad_request(f"structured_outputs.json_object must be true or false, got {show(v)}",
                                  "structured_outputs.json_object")
            found.append((f"structured_outputs.{key}", _make(kind, v, f"structured_outputs.{key}")))
    if not found:
        return None
    if len(found) > 1:
        raise bad_request(f"give one structured-output constraint per request, got {found[0][0]} and {found[1][0]}",
                          found[1][0])
    param, c = found[0]
    try:
        grammar.check(c)
    except ValueError as e:
        raise bad_request(f"{param} cannot be used for structured output: {e}", param) from None
    return c


def parse_logit_bias(body: dict, vocab_size: int) -> dict[int, float]:
    v = body.get("logit_bias")
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise bad_request(f'logit_bias must be an object from token ids to biases, such as {{"50256": -100}}, got '
                          f"{show(v)}", "logit_bias")
    out = {}
    for key, bias in v.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 12) or int(key) >= vocab_size:
            raise bad_request(f"logit_bias has the key {show(key)}, which is not a token id of this model: keys are "
                              f"token ids in [0, {vocab_size}) written as strings", "logit_bias")
        if (not isinstance(bias, (int, float)) or isinstance(bias, bool) or not math.isfinite(bias)
                or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS):
            raise bad_request(f"logit_bias[{show(key)}] must be a number in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}], "
                              f"got {show(bias)}", "logit_bias")
        out[int(key)] = float(bias)
    return out
