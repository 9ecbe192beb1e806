"""The plain data between the engine, the model runner and the CUDA-graph runner (DESIGN.md principle 5).

A step's batch is a list of `RunItem`s, one per request; the runner (or a replayed graph) returns
one `RunOutput`. Nothing here holds model state, so every part of `moekit.infer` can import it.

Shape legend: R rows of logits (num_logits per item, in item order), V vocabulary, L MoE layers,
E experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RunItem:
    token_ids: list[int]  # tokens to compute
    start: int  # position of the first one = tokens of this request already in the cache
    block_ids: list[int]  # the request's block table, covering start + len(token_ids) tokens
    num_logits: int  # logits wanted for the last num_logits tokens (0 for a partial prefill chunk)
    request_id: str = ""  # keys the request's encoder-cache entry (images); else for logs and tests
    image_positions: list[int] = field(default_factory=list)  # the request's image markers (positions)
    # Prompt logprobs: the token that follows each of the first len(prompt_targets) tokens; their logits come
    # after every item's num_logits rows (so the sampling rows keep their places), prompt_top alternatives each.
    prompt_targets: list[int] = field(default_factory=list)
    prompt_top: int = 0


@dataclass
class RunOutput:
    logits_RV: torch.Tensor  # float32, rows in item order, num_logits rows per item; then the prompt-logprob rows
    tokens_per_expert_LE: torch.Tensor | None  # int64 on the CPU; None for a dense model
