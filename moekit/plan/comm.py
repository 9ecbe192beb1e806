"""The bytes one rank's collectives carry in one moekit training step, by kind, predicted from the configuration.

    from moekit.plan.comm import step_collectives
    c = step_collectives(get_preset("tiny"), dp=2, tp=1, zero=3, micro_batches=1, tokens_per_micro=128)
    c.payload_by_kind()     # {"all_gather": ..., "reduce_scatter": ..., "all_reduce": ...}
    c.wire_by_kind()        # what a ring algorithm puts on this rank's link (WIRE_FACTOR)

Bytes are the *payload*, the whole logical tensor of each collective (all-reduce and broadcast: the tensor;
all-gather: its gathered output; reduce-scatter: its unreduced input), the same on every rank of the group;
moekit/parallel/collectives.py counts the same quantity on a running job and tests/parallel/test_plan_bytes.py
compares. The
bytes one rank sends (and receives) on a ring follow: all-reduce 2(n-1)/n x payload, all-gather and reduce-scatter
(n-1)/n, broadcast 1 (nccl-tests' PERFORMANCE.md "bus bandwidth" factors; Thakur et al. 2005 for the algorithms).

What moekit issues per optimizer step of m micro-batches of t tokens per data-parallel rank (read from
moekit/parallel/*.py and moekit/train/loop.py, then counted on gloo):

data parallel (dp > 1), over the data-parallel group
- DDP (--zero 0): every gradient all-reduced once per step, in DDP's buckets (with --tp, one all-reduce per
  parameter of its local shard: moekit's `apply_replicate`). Gradient accumulation syncs the last micro-batch only.
- ZeRO-1 (--zero 1): the same all-reduce, then every updated weight broadcast by its owner
  (ZeroRedundancyOptimizer, one broadcast per parameter). DeepSpeed's ZeRO-1 reduce-scatters and all-gathers
  instead, the same bytes on the wire (ZeRO paper section 7).
- FSDP2 (--zero 2/3): each block's and the root's weights all-gathered before their forward in every micro-batch
  (shards padded to equal size), --zero 3 the blocks again before their backward, and the gradients
  reduce-scattered once per step (FSDP2 defers it under `set_requires_gradient_sync(False)`).
- the MoE's global-batch load-balancing statistic, E + 1 float32 per MoE layer per micro-batch
  (`sum_router_counts`), and the step's four float64 losses.
- the global gradient norm, when gradients are DTensors (FSDP2 or --tp): an all-reduce of a float32 norm per
  parameter tensor (torch's `get_total_norm` stacks the per-tensor norms, DTensor reduces the stack), over each
  mesh dimension the gradients are sharded on (two for FSDP2 x TP).

tensor parallel (tp > 1), over the tensor group, per micro-batch (x = t x D activations; Megatron-LM, Shoeybi et
al. 2019; with sequence parallelism, Korthikanti et al. 2022, each of its all-reduces is an all-gather plus a
reduce-scatter of the same payload)
- sequence parallel: all-gather before attention, the MLP/MoE and lm_head, reduce-scatter after attention, the
  MLP/MoE and the embedding, each mirrored in the backward (2L + 1 of each way, each way); the norms' weight
  gradients all-reduced (D each, 2L + 1 norms).
- without it: all-reduce after the embedding, attention and the MLP/MoE; in the backward, before attention, the
  MLP/MoE and lm_head.
- MQA (one KV head, replicated): wk/wv's weight gradients all-reduced (D x head_dim each), and the gradient of
  their input all-reduced too (x each, twice per layer), where Megatron sums it locally into the attention input's
  one reduction: moekit's `ReplicateParallel` returns it Replicate, so DTensor reduces it there.
- each MoE layer's router-logit gradient, t x E float32, all-reduced (moekit's `RouterParallel`).
- the vocabulary-parallel cross-entropy (`loss_parallel`): three all-reduces of t float32 (the max, the sum of
  exponentials, the target logit).
- activation recomputation (--recompute full or selective) runs each block's forward again in the backward up to
  its last saved tensor (torch.utils.checkpoint stops early): its attention collectives and the MLP/MoE's input
  all-gather again, not the MLP/MoE's output reduction; and the load-balancing all-reduce again.

Pipeline (send/recv between stages) and expert parallelism (all-to-all) are not moekit layouts yet: not predicted.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from moekit.config import ModelConfig
from moekit.plan.shards import Precision, fsdp_padded_numel, get_precision, params, tp_shape

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all")
WIRE_FACTOR = {  # bytes one rank sends (and receives) per payload byte, ring algorithms, n ranks
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0 if n > 1 else 0.0,
    "all_to_all": lambda n: (n - 1) / n,
}
LOSS_TERMS, LOSS_BYTES = 4, 8  # the trainer's loss, ce, aux, z: float64 sums (moekit.train.loop.train_step)
STAT_BYTES = 4  # router statistics and logits are float32 (moekit/model/moe.py Router)


@dataclass
class Collective:
    """One source of traffic in a step: `calls` collectives of one kind over one group, `payload` bytes in all."""

    kind: str
    group: str  # "dp" or "tp"
    group_size: int
    what: str
    calls: int | None  # None: DDP's buckets (their number depends on its 25 MB bucket cap)
    payload: float

    @property
    def wire(self) -> float:
        return self.payload * WIRE_FACTOR[self.kind](self.group_size)


@dataclass
class StepComm:
    """Every collective of one training step on one rank."""

    collectives: list[Collective] = field(default_factory=list)

    def add(self, kind: str, group: str, size: int, what: str, calls: int | None, payload: float) -> None:
        if payload > 0 and size > 1:
            self.collectives.append(Collective(kind, group, size, what, calls, payload))

    def payload_by_kind(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for c in self.collectives:
            out[c.kind] += c.payload
        return dict(out)

    def wire_by_kind(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for c in self.collectives:
            out[c.kind] += c.wire
        return dict(out)

    def wire_by_group(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for c in self.collectives:
            out[c.group] += c.wire
        return dict(out)

    @property
    def payload(self) -> float:
        return sum(c.payload for c in self.collectives)

    @property
    def wire(self) -> float:
        return sum(c.wire for c in self.collectives)

    def to_dict(self) -> dict:
        return {"collectives": [dict(vars(c), wire=c.wire) for c in self.collectives],
                "payload_by_kind": self.payload_by_kind(), "wire_by_kind": self.wire_by_kind(),
                "wire_by_group": self.wire_by_group(), "payload": self.payload, "wire": self.wire}


def step_collectives(cfg: ModelConfig, *, dp: int = 1, tp: int = 1, zero: int = 0, precision: str = "fp32",
                     micro_batches: int = 1, tokens_per_micro: int = 1, sequence_parallel: bool = True,
                     recompute: str = "none", grad_clip: bool = True) -> StepComm:
    """The collectives of one optimizer step of `micro_batches` micro-batches of `tokens_per_micro` tokens per
    data-parallel rank (module docstring). `precision` as in moekit.plan.shards; `recompute` none|full|selective."""
    prec = get_precision(precision)
    m, t = micro_batches, tokens_per_micro
    ps = params(cfg)
    n_moe = cfg.n_moe_layers
    again = recompute != "none"  # the forward's collectives run again in the backward (module docstring)
    out = StepComm()

    if dp > 1:
        local = [math.prod(tp_shape(p, tp)) for p in ps]
        if zero <= 1:
            calls = len(ps) if tp > 1 else None
            what = "gradients, per parameter (DDP x TP)" if tp > 1 else "gradients (DDP buckets)"
            out.add("all_reduce", "dp", dp, what, calls, prec.gradients * sum(local))
            if zero == 1:
                out.add("broadcast", "dp", dp, "updated weights from their owners (ZeRO-1)", len(ps),
                        prec.weights * sum(local))
        else:
            groups: dict[str, int] = defaultdict(int)
            for p in ps:
                groups[p.group] += dp * fsdp_padded_numel(p, tp, dp)
            blocks = sum(v for g, v in groups.items() if g != "root")
            out.add("all_gather", "dp", dp, "weights before each forward (FSDP2)", m * len(groups),
                    m * prec.weights * sum(groups.values()))
            if zero == 3:
                out.add("all_gather", "dp", dp, "block weights again before each backward (ZeRO-3)",
                        m * (len(groups) - 1), m * prec.weights * blocks)
            out.add("reduce_scatter", "dp", dp, "gradients (FSDP2)", len(groups), prec.gradients * sum(groups.values()))
        counts = m * n_moe * (2 if again else 1)
        out.add("all_reduce", "dp", dp, "router counts (global-batch load balancing)", counts,
                counts * (cfg.n_expert + 1) * STAT_BYTES)
        out.add("all_reduce", "dp", dp, "the step's losses", 1, LOSS_TERMS * LOSS_BYTES)
    if grad_clip:
        # The stacked per-tensor norms reduced over each mesh dimension the gradients are sharded on, one after
        # the other (DTensor warns that a flattened mesh would take one): FSDP2's data-parallel one, the tensor one.
        for group, size, sharded in (("dp", dp, zero >= 2), ("tp", tp, True)):
            if sharded:
                out.add("all_reduce", group, size, "gradient norm (clipping)", 1, STAT_BYTES * len(ps))
    if tp > 1:
        _tensor_parallel(out, cfg, tp, m, t, prec, sequence_parallel, again)
    return out


def _tensor_parallel(out: StepComm, cfg: ModelConfig, tp: int, m: int, t: int, prec: Precision, sp: bool,
                     again: bool) -> None:
    D, L, n_moe = cfg.d_model, cfg.n_layer, cfg.n_moe_layers
    x = t * D * prec.activations  # one micro-batch's activations of one rank
    mqa = cfg.n_kv_head == 1  # its K/V projections replicated (moekit.parallel.tensor)
    if sp:
        # forward: reduce-scatter after the embedding and after each attention and MLP, all-gather before each
        # attention and MLP and before lm_head (2L + 1 each); the backward mirrors each; recomputation repeats
        # each block's two all-gathers and its attention's reduce-scatter.
        gathers = 2 * (2 * L + 1) + (2 * L if again else 0)
        scatters = 2 * (2 * L + 1) + (L if again else 0)
        out.add("all_gather", "tp", tp, "activations (sequence parallel)", m * gathers, m * gathers * x)
        out.add("reduce_scatter", "tp", tp, "activations (sequence parallel)", m * scatters, m * scatters * x)
        norms = [p for p in params(cfg) if p.name.split(".")[-2].endswith("norm")]
        out.add("all_reduce", "tp", tp, "norm weight gradients (sequence parallel)", m * len(norms),
                m * prec.gradients * sum(p.numel for p in norms))
    else:
        # forward: after the embedding, attention and MLP; backward: before attention, the MLP and lm_head.
        calls = (1 + 2 * L) + (2 * L + 1) + (L if again else 0)
        out.add("all_reduce", "tp", tp, "activations (tensor parallel)", m * calls, m * calls * x)
    if mqa:
        kv = [p for p in params(cfg) if ".attn.wk." in p.name or ".attn.wv." in p.name]
        out.add("all_reduce", "tp", tp, "MQA wk/wv weight gradients", m * len(kv),
                m * prec.gradients * sum(p.numel for p in kv))
        out.add("all_reduce", "tp", tp, "MQA wk/wv input gradients", m * 2 * L, m * 2 * L * x)
    out.add("all_reduce", "tp", tp, "router logit gradients", m * n_moe, m * n_moe * t * cfg.n_expert * STAT_BYTES)
    out.add("all_reduce", "tp", tp, "vocabulary-parallel cross-entropy", 3 * m, 3 * m * t * STAT_BYTES)


__all__ = ["KINDS", "WIRE_FACTOR", "Collective", "StepComm", "step_collectives"]
