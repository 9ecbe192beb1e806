"""One pipeline stage's step, the unit serve.py's plain roofline and serve_time.py's model from its parts both
return, and the two pieces both compute it from: the experts a batch touches and a message's time on a link.

    from moekit.plan.stage_step import StageStep, expert_coverage, transfer
    expert_coverage(16, 2, 8)       # 10.5 of GPT-4's 16 experts for 8 tokens
"""
from __future__ import annotations

from dataclasses import dataclass


def expert_coverage(n_expert: int, top_k: int, tokens: float) -> float:
    """Expected distinct experts `tokens` tokens touch in one layer under uniform random top-k routing.

    A token's k experts are a uniform k-subset, so it misses a given expert with probability
    1 - k/E exactly; tokens route independently, so the expert stays untouched with (1 - k/E)^B.
    """
    if n_expert <= 1:
        return float(n_expert)
    return n_expert * (1 - (1 - top_k / n_expert) ** tokens)


@dataclass
class StageStep:
    """One stage's time for one micro-batch (decode: one token per sequence; prefill: one chunk)."""

    stage: int
    compute_s: float
    memory_s: float
    comm_s: float
    hop_s: float
    flops: float  # per GPU
    bytes: float  # read from HBM per GPU
    overhead_s: float = 0.0  # launches and dispatch: layers x the hardware entry's layer_overhead_us

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s) + self.comm_s + self.overhead_s


def transfer(nbytes: float, bandwidth: float, latency_s: float) -> float:
    """Seconds to move `nbytes` over a link of `bandwidth` bytes/s with `latency_s` per message."""
    if nbytes <= 0:
        return 0.0
    if bandwidth <= 0:
        raise ValueError("the hardware entry has no link bandwidth (nvlink_gb_s / internode_gb_s) for "
                         "multi-GPU serving: add it to the hardware file")
    return nbytes / bandwidth + latency_s
