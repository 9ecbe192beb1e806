"""Training metrics: MFU against a measured GEMM peak, bits per byte, MoE routing statistics, the log line.

MFU (SPEC section 6) = model FLOPs per second / peak FLOPs, counting *active* parameters only:
training FLOPs per token = 3 x forward (forward + backward = 1 + 2), and forward = 2 x active
matmul parameters + attention 4 x layers x context x attention width (`moekit.counts`). As in
PaLM (Chowdhery et al. 2022, appendix B) and nanoGPT, attention is counted at the full sequence
length, without halving for the causal mask, so figures compare with published MFUs.

The peak is measured, not taken from a datasheet: `peak_flops` times large matrix multiplies in the
training dtype on this machine (`measure_gemm_peak`). The planner's `moekit bench hardware`
measurement can replace the probe there.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from moekit.config import ModelConfig
from moekit.counts import flops_per_token

LN2 = math.log(2)


# ---- FLOPs and MFU --------------------------------------------------------------------------------
def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs for one training token at `seq_len` context: 3 x forward."""
    return 3 * flops_per_token(cfg, context=seq_len).total


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops_per_s: float) -> float:
    return tokens_per_s * flops_per_token / peak_flops_per_s


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_gemm_peak(dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                      n: int | None = None, min_seconds: float = 0.5) -> float:
    """Best FLOP/s of an n x n x n matrix multiply in `dtype` (a quick probe of the compute peak)."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    c = a @ b  # warm-up: thread pools, kernel selection
    _sync(device)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < min_seconds or best == float("inf"):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=c)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(dtype: torch.dtype, device: str | torch.device = "cpu") -> tuple[float, str]:
    """(peak FLOP/s, where it came from) for MFU. Today a quick GEMM probe of this machine.

    This is the one place to plug in a stored hardware measurement (the planner's
    `moekit bench hardware`) instead of re-measuring at every start.
    """
    return measure_gemm_peak(dtype, device), f"gemm probe ({str(dtype).removeprefix('torch.')}, this machine)"


# ---- bits per byte ------------------------------------------------------------------------------
def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    """Cross-entropy in bits per UTF-8 byte of text: tokenizer-independent (Gao et al. 2020, The Pile).

    total_nats = sum of per-token cross-entropy (natural log); total_bytes = bytes those tokens spell.
    """
    if total_bytes <= 0:
        raise ValueError("bits per byte needs at least one byte of text")
    return total_nats / LN2 / total_bytes


# ---- MoE routing ----------------------------------------------------------------------------------
class RoutingStats:
    """Per-layer routing metrics summed over a logging interval (from `ModelOutput.routing`).

    Counts are accumulated as tensors on the model's device and read once per interval (no host sync
    per step).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.counts_LE: torch.Tensor | None = None
        self.dropped_L: torch.Tensor | None = None
        self.entropy_L: torch.Tensor | None = None
        self.n_batches = 0

    def add(self, routing: list) -> None:
        if not routing:
            return
        counts = torch.stack([r.tokens_per_expert_E for r in routing]).to(torch.float64)
        dropped = torch.stack([r.dropped for r in routing]).to(torch.float64)
        entropy = torch.stack([r.entropy for r in routing]).to(torch.float64)
        if self.counts_LE is None:
            self.counts_LE, self.dropped_L, self.entropy_L = counts, dropped, entropy
        else:
            self.counts_LE += counts
            self.dropped_L += dropped
            self.entropy_L += entropy
        self.n_batches += 1

    def all_reduce(self, group) -> None:
        """Sum the interval's statistics over the data-parallel ranks (every rank calls it at the same step)."""
        if self.counts_LE is None:
            return
        import torch.distributed as dist

        packed = torch.cat([self.counts_LE.flatten(), self.dropped_L, self.entropy_L])
        dist.all_reduce(packed, group=group)
        L = self.dropped_L.numel()
        self.counts_LE, self.dropped_L, self.entropy_L = packed[:-2 * L].view_as(self.counts_LE), packed[-2 * L:-L], \
            packed[-L:]
        self.n_batches *= dist.get_world_size(group)  # entropy: a mean over every rank's batches

    def summary(self) -> dict | None:
        """imbalance = max/mean tokens per expert (1 = balanced); dead = experts that got no token."""
        if self.counts_LE is None:
            return None
        counts = self.counts_LE.cpu()
        routed = counts.sum(-1)
        dropped = self.dropped_L.cpu()
        mean = counts.mean(-1).clamp_min(1e-12)
        return {
            "tokens_per_expert": counts.long().tolist(),
            "imbalance": (counts.max(-1).values / mean).tolist(),
            "entropy": (self.entropy_L.cpu() / self.n_batches).tolist(),
            "dropped_frac": (dropped / (routed + dropped).clamp_min(1)).tolist(),
            "dead_experts": (counts == 0).sum(-1).tolist(),
        }


# ---- the log line and metrics.jsonl ------------------------------------------------------------------
def human_rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e4 else f"{x:.0f}"


def format_log_line(step: int, loss: float, lr: float, tokens_per_s: float, mfu_frac: float | None,
                    imbalance: float | None = None, layout: str | None = None,
                    comm_share: float | None = None, ep_received: list[float] | None = None,
                    bubble: float | None = None) -> str:
    """`step 120 | loss 3.210 | lr 3.0e-04 | 152.0k tok/s | mfu 41.2% | moe imbalance 1.08` (DESIGN.md),
    then `| dp2 x tp2 ZeRO-1 | comm 23%` for a distributed run: the share of a step spent in collectives
    (measured on the interval's last step, moekit/train/loop.py `_comm_counter`), and with --ep `ep rows 1.2k-1.4k`:
    the fewest and most rows (token-expert assignments) an expert rank received per step, the exchange's balance;
    with --pp `bubble 18%`: the largest idle share of a step among the pipeline stages (each one's in metrics.jsonl
    `pp_idle`; moekit/plan/train.py `pipeline_bubble` predicts it).

    `loss` is the mean over the interval's steps (cross-entropy + router losses); `moe imbalance` is the
    worst MoE layer's max/mean tokens per expert over the interval (the straggler that sets the pace).
    """
    parts = [f"step {step}", f"loss {loss:.3f}", f"lr {lr:.1e}", f"{human_rate(tokens_per_s)} tok/s"]
    if mfu_frac is not None:
        parts.append(f"mfu {100 * mfu_frac:.1f}%")
    if imbalance is not None:
        parts.append(f"moe imbalance {imbalance:.2f}")
    if layout:
        parts.append(layout)
    if comm_share is not None:
        parts.append(f"comm {100 * comm_share:.0f}%")
    if ep_received:
        parts.append(f"ep rows {human_rate(min(ep_received))}-{human_rate(max(ep_received))}")
    if bubble is not None:
        parts.append(f"bubble {100 * bubble:.0f}%")
    return " | ".join(parts)


class MetricsLog:
    """Appends one JSON object per line to `metrics.jsonl`, flushed at once (a crash loses nothing)."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled  # False on every rank of a distributed run but the main one
        self.file = None  # opened at the first record: constructing a trainer writes nothing

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.file is None:
            self._drop_torn_tail()
            self.file = open(self.path, "a", encoding="utf-8")
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def _drop_torn_tail(self) -> None:
        """A run killed mid-write leaves a last line without its newline; appending to it would glue the
        resumed run's first record onto the fragment and lose both. Cut the file back to its last newline."""
        if not self.path.exists():
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (killed mid-write) is skipped."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
