"""Engine outputs -> OpenAI's response objects: completions, chat completions, stream chunks, logprobs, usage.

Shapes follow OpenAI's API reference:
- `text_completion`: choices of {index, text, logprobs, finish_reason}; logprobs in the legacy
  layout {tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset};
- `chat.completion`: choices of {index, message: {role, content}, logprobs: {content: [{token,
  logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}, finish_reason};
- streams: one chunk per engine step and choice (`chat.completion.chunk` chunks carry a `delta`;
  the first one per choice has the role); with `stream_options.include_usage` every chunk has
  `"usage": null` and a last chunk with no choices carries the usage;
- usage: prompt tokens counted once per prompt (not per choice), completion tokens over all
  choices, `prompt_tokens_details.cached_tokens` from the prefix cache.
Logprobs are clamped at -9999 because JSON has no -Infinity (vLLM does the same). In the legacy
layout the sampled token is added to `top_logprobs` when it is not among the top N, as vLLM does.
With `echo` and `logprobs` the prompt's tokens come first (the first one's logprob and alternatives are
null: nothing precedes it), their text offsets counted from the start of the prompt; streamed, the prompt's text
and its logprobs wait for the first output so that they travel in one chunk. `max_tokens` 0 returns no output:
the engine samples one token (the prompt's logprobs come from that prefill) and it is dropped here.
"""

from __future__ import annotations

from moekit.infer.engine import RequestOutput
from moekit.infer.sampler import Logprob
from moekit.serve import tools
from moekit.serve.async_engine import Event
from moekit.serve.errors import APIError
from moekit.serve.protocol import GenerateRequest

MIN_LOGPROB = -9999.0


class TokenText:
    """Token id -> its text (special tokens included), cached: logprobs name up to 21 tokens per position."""

    def __init__(self, codec):
        self.codec, self.cache, self.widths = codec, {}, {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.codec.tokenizer.decode([token_id], skip_special_tokens=False) if self.codec else str(token_id)
            if len(self.cache) < 1_000_000:
                self.cache[token_id] = text
        return text

    def width(self, token_id: int) -> int:
        """Characters the token adds to the response's text (`text_offset` steps): a special token's name is in
        `tokens` but not in the text, which is decoded without them."""
        w = self.widths.get(token_id)
        if w is None:
            w = len(self.codec.tokenizer.decode([token_id], skip_special_tokens=True)) if self.codec else len(
                str(token_id))
            if len(self.widths) < 1_000_000:
                self.widths[token_id] = w
        return w


def _with_refusal(logprobs: dict | None) -> dict | None:
    """Chat logprobs as OpenAI's schema requires them: {content, refusal} (refusal: null, nothing is refused)."""
    return None if logprobs is None else {**logprobs, "refusal": None}


def _lp(x: float) -> float:
    return max(x, MIN_LOGPROB)


class _Choice:
    def __init__(self, index: int, prefix: str = ""):
        self.index, self.text, self.offset = index, prefix, len(prefix)
        self.finish_reason: str | None = None
        self.logprobs: dict | None = None
        self.final = None


class Responder:
    """Accumulates the choices of one HTTP request and renders them as OpenAI objects."""

    def __init__(self, req: GenerateRequest, response_id: str, created: int, token_text: TokenText,
                 echo_texts: list[str] | None = None, prompt_ids: list[list[int]] | None = None,
                 tool_parser: str | None = None):
        self.req, self.id, self.created, self.tt = req, response_id, created, token_text
        n_choices = req.n * len(req.prompts)
        self.echo = [echo_texts[i // req.n] for i in range(n_choices)] if echo_texts else [""] * n_choices
        self.choices = [_Choice(i, self.echo[i]) for i in range(n_choices)]
        self.prompt_ids = prompt_ids or []  # per prompt: the prompt's logprobs name its tokens
        self.no_output = req.max_tokens == 0
        # Tools (tools.py): the output becomes tool calls once it is complete, so with a stream the text is held
        # back and sent at the end, as content or as tool_calls (one delta; OpenAI's stream shape allows it).
        self.tools, self.tool_parser = (req.tools if req.tools and req.tools.choice != "none" else None), tool_parser
        # Streamed echo with logprobs: the prompt's text goes out with its logprobs, on the first output.
        self.echo_pending = [bool(e) and req.logprobs is not None and req.stream for e in self.echo]
        self.object = "chat.completion" if req.chat else "text_completion"

    # ---- logprobs ----------------------------------------------------------------------------------
    def _logprobs(self, choice: _Choice, lps: list[Logprob]) -> dict | None:
        if self.req.logprobs is None:
            return None
        tt = self.tt
        if self.req.chat:
            content = [{"token": (t := tt(lp.token_id)), "logprob": _lp(lp.logprob), "bytes": list(t.encode()),
                        "top_logprobs": [{"token": (s := tt(i)), "logprob": _lp(v), "bytes": list(s.encode())}
                                         for i, v in lp.top]} for lp in lps]
            return {"content": content}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in lps:
            tok = tt(lp.token_id)
            top = {tt(i): _lp(v) for i, v in lp.top}
            top.setdefault(tok, _lp(lp.logprob))
            out["tokens"].append(tok)
            out["token_logprobs"].append(_lp(lp.logprob))
            out["top_logprobs"].append(top)
            out["text_offset"].append(choice.offset)
            choice.offset += tt.width(lp.token_id)
        return out

    def _prompt_logprobs(self, prompt_ids: list[int], lps: list[Logprob]) -> dict:
        """The legacy layout of the prompt's tokens: the first has no logprob (nothing precedes it)."""
        tt = self.tt
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = 0
        for i, tok_id in enumerate(prompt_ids):
            tok = tt(tok_id)
            out["tokens"].append(tok)
            out["text_offset"].append(offset)
            offset += tt.width(tok_id)
            if i == 0:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            lp = lps[i - 1]
            top = {tt(t): _lp(v) for t, v in lp.top}
            top.setdefault(tok, _lp(lp.logprob))
            out["token_logprobs"].append(_lp(lp.logprob))
            out["top_logprobs"].append(top)
        return out

    def _keep_logprobs(self, choice: _Choice, delta: dict | None) -> None:
        if delta is None:
            return
        if choice.logprobs is None:
            choice.logprobs = {k: [] for k in delta}
        for k, v in delta.items():
            choice.logprobs[k] += v

    # ---- events -------------------------------------------------------------------------------------
    def add(self, ev: Event) -> tuple[str, dict | None] | None:
        """Fold one event into its choice; the (new text, new logprobs) to stream, None if nothing to say."""
        choice = self.choices[ev.index]
        if ev.final is not None:
            choice.final = ev.final
            if ev.final.error is not None:
                raise APIError(500, f"The engine failed while generating: {ev.final.error}", code="engine_error")
            if ev.final.finish_reason == "abort":
                raise APIError(503, "The request was cancelled: the server is shutting down; retry later",
                               code="service_unavailable")
            choice.finish_reason = ev.final.finish_reason
        out: RequestOutput | None = ev.output
        if out is None:
            return None
        head_text, head = "", None
        if out.prompt_logprobs is not None and self.echo[ev.index] and self.req.logprobs is not None:
            head = self._prompt_logprobs(self.prompt_ids[ev.index // self.req.n], out.prompt_logprobs)
            self._keep_logprobs(choice, head)
            if self.echo_pending[ev.index]:
                head_text, self.echo_pending[ev.index] = self.echo[ev.index], False
        if self.no_output:
            if ev.final is not None:
                choice.finish_reason = "length"
            return (head_text, head) if head is not None or ev.final is not None else None
        lps = self._logprobs(choice, out.new_logprobs) if out.new_token_ids else None
        self._keep_logprobs(choice, lps)
        choice.text += out.new_text
        if self.tools is not None:  # held until the end (see __init__)
            if ev.final is None:
                return None if lps is None else ("", lps)
            message, _ = self._message(choice)
            return message.get("content") or "", lps
        if head is not None:
            lps = head if lps is None else {k: head[k] + v for k, v in lps.items()}
        if not out.new_text and not head_text and lps is None and ev.final is None:
            return None  # tokens whose text is held back (a stop string may be starting, or half a character)
        return head_text + out.new_text, lps

    def usage(self) -> dict:
        finals = [c.final for c in self.choices if c.final is not None]
        firsts = [c.final for c in self.choices[::self.req.n] if c.final is not None]  # one per prompt
        prompt = sum(f.num_prompt_tokens for f in firsts)
        completion = 0 if self.no_output else sum(f.num_output_tokens for f in finals)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(f.num_cached_tokens for f in firsts)}}

    # ---- whole responses --------------------------------------------------------------------------
    def _message(self, c: _Choice) -> tuple[dict, str | None]:
        """A chat choice's message fields ({content, tool_calls?}) and finish reason."""
        if self.tools is None or c.finish_reason is None:
            return {"content": c.text}, c.finish_reason
        return tools.finish(self.tools, self.tool_parser, c.text, c.finish_reason)

    def response(self) -> dict:
        if self.req.chat:
            choices = []
            for c in self.choices:
                message, reason = self._message(c)
                # `refusal` is required (nullable) in OpenAI's ChatCompletionResponseMessage and a choice's logprobs
                choices.append({"index": c.index, "message": {"role": "assistant", **message, "refusal": None},
                                "logprobs": _with_refusal(c.logprobs), "finish_reason": reason})
        else:
            choices = [{"index": c.index, "text": c.text, "logprobs": c.logprobs, "finish_reason": c.finish_reason}
                       for c in self.choices]
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.req.model,
                "choices": choices, "usage": self.usage()}

    # ---- stream chunks ----------------------------------------------------------------------------
    def _chunk(self, choices: list[dict]) -> dict:
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.req.chat else "text_completion",
                 "created": self.created, "model": self.req.model, "choices": choices}
        if self.req.include_usage:
            chunk["usage"] = None
        return chunk

    def first_chunks(self) -> list[dict]:
        """Chat: the assistant role of each choice; completions with echo: each prompt's text."""
        if self.req.chat:
            return [self._chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]) for c in self.choices]
        if any(self.echo) and not any(self.echo_pending):
            return [self._chunk([{"index": c.index, "text": self.echo[c.index], "logprobs": None,
                                  "finish_reason": None}]) for c in self.choices]
        return []

    def delta_chunk(self, index: int, text: str, logprobs: dict | None) -> dict:
        reason = self.choices[index].finish_reason
        if self.req.chat:
            delta = {"content": text} if text else {}
            if self.tools is not None and reason is not None:
                message, reason = self._message(self.choices[index])
                if message.get("tool_calls"):
                    delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
            return self._chunk([{"index": index, "delta": delta, "logprobs": _with_refusal(logprobs),
                                 "finish_reason": reason}])
        return self._chunk([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}])

    def usage_chunk(self) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.req.chat else "text_completion",
                "created": self.created, "model": self.req.model, "choices": [], "usage": self.usage()}
