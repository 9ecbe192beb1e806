"""A request's state as the scheduler sees it (vLLM v1 `Request`), and its text stream.

The scheduler has no prefill or decode phase (DESIGN.md principle 5): a request has
`num_tokens` (prompt + output, committed) and `num_computed_tokens` (those whose K/V is in the
cache). Prefilling is `num_computed_tokens` catching up, a chunk at a time; decoding is the steady
state `num_computed_tokens == num_tokens - 1` (the last sampled token has no K/V yet); speculative
draft tokens ride along in `spec_token_ids` until the target has checked them.

Plain data, no tensors (DESIGN.md principle 5): the scheduler, the KV manager and a simulator read
and change it without a model. The engine keeps each request's torch.Generator and its drafts'
distributions beside it, keyed by request id. The one exception, a structured-output request's grammar
matcher (`grammar`), travels with the request, since the engine and the drafter both advance it; the
scheduler and the simulator never touch it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: importing this module imports no torch
    from moekit.infer.grammar import Matcher
    from moekit.infer.sampler import Logprob, SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again; its K/V was freed and will be recomputed
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int  # admission order: first come, first served; preemption takes the newest
    eos_token_ids: tuple[int, ...] = ()
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: Status = Status.WAITING
    spec_token_ids: list[int] = field(default_factory=list)  # proposed by a drafter for the next step
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    num_preemptions: int = 0
    image_positions: list[int] = field(default_factory=list)  # where the prompt's image markers sit
    cache_salt: bytes | None = None  # roots the prefix-cache hash chain: a hash of the request's images
    # Structured output: where the committed output stands in the request's grammar (the engine's and the drafter's
    # business; the scheduler never reads it). None: unconstrained.
    grammar: Matcher | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[Logprob] = field(default_factory=list)
    read_prefix_cache: bool = True  # False for a request whose prompt positions need logits (prompt logprobs)
    prompt_logprobs: list[Logprob] = field(default_factory=list)  # entry j: prompt token j + 1 given those before
    text: str = ""  # detokenized output, stop string removed
    text_sent: int = 0  # characters of `text` already streamed
    _prefix_offset: int = 0  # incremental detokenization offsets (vLLM detokenizer / HF TextStreamer)
    _read_offset: int = 0

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def append_token(self, token: int, max_model_len: int) -> str | None:
        """Commit one sampled token; the finish reason it causes, if any (stop strings come later)."""
        tokens, p = self.all_token_ids, self.params
        tokens.append(token)
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            return "stop"
        n = len(tokens)
        if n >= max_model_len or n - len(self.prompt_token_ids) >= p.max_tokens:
            return "length"
        return None

    def detokenize(self, decode) -> str:
        """Text added by the tokens committed since the last call; holds back an incomplete UTF-8 tail.

        Decodes a short window (from `_prefix_offset`) rather than all output, as vLLM does: a byte-
        level BPE token may be half a character, which decodes to U+FFFD until the rest arrives.
        """
        out = self.output_token_ids
        if self._read_offset >= len(out):
            return ""
        prefix = decode(out[self._prefix_offset:self._read_offset])
        full = decode(out[self._prefix_offset:])
        if full.endswith("\ufffd"):
            return ""
        new = full[len(prefix):]
        self._prefix_offset, self._read_offset = self._read_offset, len(out)
        return new

    def check_stop_strings(self, new_text: str) -> bool:
        """Append `new_text` to `text`; True (text cut before the stop string) when one appears."""
        start = max(0, len(self.text) - self.params.max_stop_len + 1)  # a match may straddle the seam
        self.text += new_text
        hits = [i for s in self.params.stop for i in [self.text.find(s, start)] if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return True
        return False
