"""Chat templates: messages -> the prompt text the model continues.

Which template a server uses, first match wins (vLLM's order):
1. `--chat-template FILE_OR_TEMPLATE`, or `--chat-template default` to force the default below;
2. the model folder's `chat_template.jinja`, or `chat_template` in its `tokenizer_config.json`
   (a string, or a list of named templates, of which "default" is used) as Hugging Face saves them;
3. the default template.

Jinja templates are rendered as Hugging Face `apply_chat_template` does: a sandboxed environment
(`ImmutableSandboxedEnvironment`, trim_blocks, lstrip_blocks, loop controls), with `messages`,
`bos_token`, `eos_token`, `add_generation_prompt=True`, and HF's helpers `raise_exception`,
`strftime_now` and a `tojson` that does not escape HTML. jinja2 comes with torch; if it is
missing, a model with a Jinja template fails at start-up with a message, never at request time.
A rendered text that starts with the BOS token has it removed, because the tokenizer adds it again.

The default template (for moekit runs and models without one) is a plain-text transcript, which
a base model trained on ordinary text can continue:

    System: You are terse.

    User: Hi

    Assistant: Hello!

    User: What is 2+2?

    Assistant:

Roles print as System (system and developer), User, Assistant and Tool; turns are separated by a
blank line, and the prompt ends with "Assistant:". A base model does not know when its turn ends,
so with the default template generation also stops at "\\n\\nUser:", the start of a next turn (the
analogue of a chat model's end-of-turn token); the stop text is not returned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}
DEFAULT_STOP = ["\n\nUser:"]


def render_default(messages: list[dict]) -> str:
    turns = [f"{ROLE_NAMES[m['role']]}: {m['content']}" for m in messages]
    return "\n\n".join(turns + ["Assistant:"])


# The default template in Jinja, for clients that render prompts themselves from GET /tokenizer_info (vLLM's
# endpoint; lm-evaluation-harness's remote tokenizer): with add_generation_prompt it renders what render_default does.
DEFAULT_JINJA = (
    "{%- set names = " + json.dumps(ROLE_NAMES) + " -%}"
    "{%- for m in messages -%}{{ names[m['role']] ~ ': ' ~ m['content'] ~ '\\n\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}Assistant:{%- endif -%}")


@dataclass
class ChatTemplate:
    source: str | None = None  # Jinja text; None: the default template
    origin: str = "default"  # where it came from, for the start-up log
    bos_token: str = ""
    eos_token: str = ""
    stop: list[str] = field(default_factory=list)  # implicit stop strings of this template
    _compiled: object = None

    def __post_init__(self) -> None:
        if self.source is None:
            self.stop = list(DEFAULT_STOP)
            return
        try:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ValueError(f"the chat template from {self.origin} is Jinja, and jinja2 is not installed: "
                             "pip install jinja2, or pass --chat-template default") from None

        def raise_exception(message):  # templates call this to reject a conversation (HF convention)
            raise TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = tojson
        try:
            self._compiled = env.from_string(self.source)
        except TemplateError as e:
            raise ValueError(f"the chat template from {self.origin} does not compile: {e}") from None

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The prompt text; ValueError (a 400 for the client) if the template rejects the messages. `tools`: the
        request's functions, which a template that defines tool calls reads as `tools` (moekit/serve/tools.py)."""
        if self._compiled is None:
            if tools:
                raise ValueError("the default chat template has no tool calls")
            return render_default(messages)
        from jinja2 import TemplateError

        extra = {"tools": tools} if tools else {}
        try:
            text = self._compiled.render(messages=messages, bos_token=self.bos_token, eos_token=self.eos_token,
                                         add_generation_prompt=True, **extra)
        except TemplateError as e:
            raise ValueError(f"the model's chat template rejected these messages: {e}") from None
        if self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token):]
        return text


def _token_text(value) -> str:  # tokenizer_config.json stores special tokens as strings or {"content": ...}
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def load_chat_template(model_dir: str | Path, override: str | None = None) -> ChatTemplate:
    """The template for a model folder (see the module docstring for the order)."""
    model_dir = Path(model_dir)
    tok_config: dict = {}
    cfg_file = model_dir / "tokenizer_config.json"
    if cfg_file.is_file():
        try:
            tok_config = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None
        if not isinstance(tok_config, dict):
            tok_config = {}
    specials = dict(bos_token=_token_text(tok_config.get("bos_token")),
                    eos_token=_token_text(tok_config.get("eos_token")))
    if override is not None:
        if override == "default":
            return ChatTemplate()
        path = Path(override)
        if path.is_file():
            return ChatTemplate(path.read_text(), str(path), **specials)
        if "{" not in override:
            raise FileNotFoundError(f"--chat-template {override}: no such file (give a Jinja file, an inline "
                                    "template, or 'default')")
        return ChatTemplate(override, "--chat-template", **specials)
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return ChatTemplate(jinja_file.read_text(), str(jinja_file), **specials)
    source = tok_config.get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if isinstance(source, str) and source.strip():
        return ChatTemplate(source, str(cfg_file), **specials)
    return ChatTemplate()
