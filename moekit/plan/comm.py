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

pipeline (pp > 1): rank `stage` of the pipeline holds `stage_params` (plan/layout.py's placement) and runs only its
layers, so every count above is the stage's: its parameters, 4L' + [first] + [last] sequence-parallel gathers and
scatters for its L' layers (the embedding's scatter and its backward on the first stage, lm_head's gather and its
backward on the last), the vocabulary-parallel cross-entropy on the last stage only. Between stages, each
micro-batch's output goes to the next stage and its gradient comes back: `p2p`, one (micro_batch x seq / tp) x D
activation each way per neighbour (send/recv, not a collective: its WIRE_FACTOR is 1). moekit/parallel/dry_run.py
measures the rest of these on GPT-4's 15 stages (fake process group) and derives this one from the stage's output.

expert parallel (ep > 1), over the expert group of each MoE layer, per micro-batch: an all-to-all of the E
per-expert counts (int64), then the kept rows (t x K x D: dropless, every tensor rank holds the whole sequence
inside the MoE) out and back in the forward, and their gradients the same way in the backward: 4 all-to-alls of
t_all x K x D activations (moekit/parallel/expert.py). Expert gradients are reduced over the expert-data-parallel
ranks (dp / ep) instead of dp.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from moekit.config import ModelConfig
from moekit.plan.layout import layers_per_stage, rank_stages
from moekit.plan.shards import Precision, fsdp_padded_numel, get_precision, is_expert, local_shape, rank_params

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all", "p2p")
WIRE_FACTOR = {  # bytes one rank sends (and receives) per payload byte, ring algorithms, n ranks
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0 if n > 1 else 0.0,
    "all_to_all": lambda n: (n - 1) / n,
    "p2p": lambda n: 1.0,  # a pipeline send (or receive) crosses the link once
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
                     recompute: str = "none", grad_clip: bool = True, pp: int = 1, stage: int = 0,
                     ep: int = 1, losses: bool = True, stages_per_rank: int = 1,
                     schedule: str = "1f1b") -> StepComm:
    """The collectives of one optimizer step of `micro_batches` micro-batches of `tokens_per_micro` tokens per
    data-parallel rank (module docstring) on pipeline rank `stage` of `pp` (its stages: plan/layout.py
    `rank_stages`). `precision` as in moekit.plan.shards; `recompute` none|full|selective; `losses`: the trainer's
    all-reduce of the step's loss terms."""
    prec = get_precision(precision)
    m, t = micro_batches, tokens_per_micro
    n_stages = pp * stages_per_rank
    owned = rank_stages(pp, stage, stages_per_rank, schedule)
    ps = rank_params(cfg, pp, stage, stages_per_rank, schedule)
    layers = [i for s in owned for i in stage_layers(cfg, n_stages, s)]
    n_moe = sum(cfg.is_moe_layer(i) for i in layers)
    first, last = 0 in owned, n_stages - 1 in owned
    again = recompute != "none"  # the forward's collectives run again in the backward (module docstring)
    out = StepComm()

    if dp > 1:
        local = [math.prod(local_shape(p, tp=tp, ep=ep)) for p in ps]
        if zero <= 1:
            calls = len(ps) if tp > 1 or ep > 1 else None
            what = "gradients, per parameter (DDP x TP)" if tp > 1 or ep > 1 else "gradients (DDP buckets)"
            experts = [n for p, n in zip(ps, local, strict=True) if ep > 1 and is_expert(p)]
            out.add("all_reduce", "dp", dp, what, calls and calls - len(experts),
                    prec.gradients * (sum(local) - sum(experts)))
            out.add("all_reduce", "edp", dp // ep, "expert gradients, per parameter", len(experts),
                    prec.gradients * sum(experts))
            if zero == 1:
                out.add("broadcast", "dp", dp, "updated weights from their owners (ZeRO-1)", len(ps),
                        prec.weights * sum(local))
        else:
            groups: dict[str, int] = defaultdict(int)
            units: dict[str, int] = defaultdict(int)  # --ep: each MoE layer's experts, a unit over dp / ep ranks
            edp = dp // ep
            for p in ps:
                if ep > 1 and is_expert(p):
                    shape = local_shape(p, tp=tp, ep=ep)
                    units[p.group] += edp * -(-shape[0] // edp) * math.prod(shape[1:])
                else:
                    groups[p.group] += dp * fsdp_padded_numel(p, tp, dp)
            blocks = sum(v for g, v in groups.items() if g != "root")
            if units:
                n, total = len(units), sum(units.values())
                out.add("all_gather", "edp", edp, "expert weights before each forward (FSDP2)", m * n, m * prec.weights
                        * total)
                if zero == 3:
                    out.add("all_gather", "edp", edp, "expert weights again before each backward (ZeRO-3)", m * n,
                            m * prec.weights * total)
                out.add("reduce_scatter", "edp", edp, "expert gradients (FSDP2)", n, prec.gradients * total)
            out.add("all_gather", "dp", dp, "weights before each forward (FSDP2)", m * len(groups),
                    m * prec.weights * sum(groups.values()))
            if zero == 3:
                out.add("all_gather", "dp", dp, "block weights again before each backward (ZeRO-3)",
                        m * (len(groups) - 1), m * prec.weights * blocks)
            out.add("reduce_scatter", "dp", dp, "gradients (FSDP2)", len(groups), prec.gradients * sum(groups.values()))
        counts = m * n_moe * (2 if again else 1)
        out.add("all_reduce", "dp", dp, "router counts (global-batch load balancing)", counts,
                counts * (cfg.n_expert + 1) * STAT_BYTES)
        if losses:
            out.add("all_reduce", "dp", dp, "the step's losses", 1, LOSS_TERMS * LOSS_BYTES)
    if grad_clip:
        # The stacked per-tensor norms reduced over each mesh dimension the gradients are sharded on, one after
        # the other (DTensor warns that a flattened mesh would take one): FSDP2's data-parallel one, the tensor one.
        for group, size, sharded in (("dp", dp, zero >= 2), ("tp", tp, True)):
            if sharded:
                out.add("all_reduce", group, size, "gradient norm (clipping)", 1, STAT_BYTES * len(ps))
    if tp > 1:
        _tensor_parallel(out, cfg, ps, len(layers), n_moe, first, last, tp, m, t, prec, sequence_parallel, again)
    if ep > 1 and n_moe:
        rows = t * cfg.top_k * cfg.d_model * prec.activations  # every tensor rank routes the whole sequence
        out.add("all_to_all", "ep", ep, "per-expert counts (int64)", m * n_moe, m * n_moe * cfg.n_expert * 8)
        out.add("all_to_all", "ep", ep, "rows to their experts and back, forward and backward", 4 * m * n_moe,
                4 * m * n_moe * rows)
    if pp > 1 and cfg.tie_embeddings and first != last:  # (a rank holding both ends, ZB-V's first, has no copy)
        # Megatron's embedding group: the first stage's embedding and the last stage's copy sum their gradients
        # once per step (moekit/parallel/pipeline.py `sync_tied_grads`), each tensor rank its vocabulary shard.
        # Under FSDP2 each rank's gradient is its shard of the embedding.
        emb = ps[0] if first else ps[-1]
        numel = fsdp_padded_numel(emb, tp, dp) if zero >= 2 and dp > 1 else math.prod(local_shape(emb, tp=tp))
        out.add("all_reduce", "embedding", 2, "tied embedding gradients (first and last stage)", 1,
                prec.gradients * numel)
    if pp > 1:
        x = t // (tp if tp > 1 and sequence_parallel else 1) * cfg.d_model * prec.activations
        # Each boundary between one of this rank's stages and a stage on another rank carries every micro-batch's
        # activations one way and their gradients back (interleaved and ZB-V ranks have up to 2 per stage).
        neighbours = sum((s > 0 and s - 1 not in owned) + (s < n_stages - 1 and s + 1 not in owned) for s in owned)
        out.add("p2p", "pp", 2, "activations to the next stage, gradients back (send/recv)", 2 * m * neighbours,
                2 * m * neighbours * x)
    return out


def stage_layers(cfg: ModelConfig, pp: int, stage: int) -> range:
    """The layers of pipeline stage `stage` of `pp` (plan/layout.py's placement)."""
    counts = layers_per_stage(cfg.n_layer, pp)
    first = sum(counts[:stage])
    return range(first, first + counts[stage])


def _tensor_parallel(out: StepComm, cfg: ModelConfig, ps: list, L: int, n_moe: int, first: bool, last: bool,
                     tp: int, m: int, t: int, prec: Precision, sp: bool, again: bool) -> None:
    D = cfg.d_model
    x = t * D * prec.activations  # one micro-batch's activations of one rank
    mqa = cfg.n_kv_head == 1  # its K/V projections replicated (moekit.parallel.tensor)
    if sp:
        # forward: reduce-scatter after the embedding and after each attention and MLP, all-gather before each
        # attention and MLP and before lm_head (2L + 1 each); the backward mirrors each; recomputation repeats
        # each block's two all-gathers and its attention's reduce-scatter. A pipeline stage has the embedding's
        # only if it is the first, lm_head's only if it is the last.
        gathers = 4 * L + first + last + (2 * L if again else 0)
        scatters = 4 * L + first + last + (L if again else 0)
        out.add("all_gather", "tp", tp, "activations (sequence parallel)", m * gathers, m * gathers * x)
        out.add("reduce_scatter", "tp", tp, "activations (sequence parallel)", m * scatters, m * scatters * x)
        norms = [p for p in ps if p.name.split(".")[-2].endswith("norm")]
        out.add("all_reduce", "tp", tp, "norm weight gradients (sequence parallel)", m * len(norms),
                m * prec.gradients * sum(p.numel for p in norms))
    else:
        # forward: after the embedding, attention and MLP; backward: before attention, the MLP and lm_head.
        calls = (first + 2 * L) + (2 * L + last) + (L if again else 0)
        out.add("all_reduce", "tp", tp, "activations (tensor parallel)", m * calls, m * calls * x)
    if mqa:
        kv = [p for p in ps if ".attn.wk." in p.name or ".attn.wv." in p.name]
        out.add("all_reduce", "tp", tp, "MQA wk/wv weight gradients", m * len(kv),
                m * prec.gradients * sum(p.numel for p in kv))
        out.add("all_reduce", "tp", tp, "MQA wk/wv input gradients", m * 2 * L, m * 2 * L * x)
    out.add("all_reduce", "tp", tp, "router logit gradients", m * n_moe, m * n_moe * t * cfg.n_expert * STAT_BYTES)
    if last:
        out.add("all_reduce", "tp", tp, "vocabulary-parallel cross-entropy", 3 * m, 3 * m * t * STAT_BYTES)


__all__ = ["KINDS", "WIRE_FACTOR", "Collective", "StepComm", "stage_layers", "step_collectives"]
