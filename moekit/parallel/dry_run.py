"""A training layout at full scale, without the GPUs: `moekit train --preset gpt4 --tp 8 --pp 15 --dp 208 --zero 1
--dry-run`.

    report = dry_run(get_preset("gpt4"), ParallelDims.from_flags(24_960, tp=8, pp=15, dp=208, zero=1))
    print(format_dry_run(report))

For each *distinct* rank of the layout (ranks whose shards differ: the first, a middle and the last pipeline stage;
under ZeRO-1 the data rank whose optimizer partition is fullest and the one that is emptiest; tensor rank 0, which
holds the larger piece of an uneven vocabulary split; expert ranks are symmetric), this process joins torch's
"fake" process group of the whole world as that rank (no peer exists: every collective returns at once, unchanged),
builds the real `Transformer` under `FakeTensorMode` (tensors with shapes and a CPU device but no memory: the
meta device cannot run the model, whose router and experts ask autocast about their device), deletes what the
rank's pipeline stage does not own with the pipeline's own `split_model` (the planner's placement rule,
plan/layout.py), applies the real `parallelize`, and runs one micro-batch forward and backward and one optimizer
step under `CollectiveCounter` (moekit/parallel/collectives.py). What it reads is what the rank would hold and send:

- weights, gradients: `held_bytes` of the parallelized stage (the local shard of every DTensor);
- optimizer: `optimizer_state_bytes` after the step: AdamW's exp_avg and exp_avg_sq (fp32) and its `step`, for the
  parameters the rank owns (ZeRO-1: `ZeroRedundancyOptimizer`'s partition, the real one, over the data ranks; with
  --tp the trainer's `ShardedZero1` over each tensor rank's local shards, moekit/parallel/zero1.py);
- activations: the bytes autograd saves for the backward in the forward of one micro-batch (saved-tensor hooks,
  weights excluded), times the micro-batches a 1F1B stage s holds at once, min(m, pp - s) (Narayanan et al. 2021);
- collectives: every collective of the micro-batch and of the step, with its payload and group;
- pipeline sends and receives: not collectives (the counter does not see them) and not run here (the schedule
  needs its peers): derived from the stage's measured output, one activation each way per micro-batch.

Two things are substituted, and the report says so:
- MoE routing: the expert kernel needs its per-expert row counts on the host (`Experts.forward` calls `tolist()`),
  and fake tensors have no values. A forward pre-hook gives it a balanced split of the same rows; the rows, and so
  every shape, byte and collective, do not depend on the routing while no token is dropped (dropless, moe.py).
  Expert parallelism's all-to-all needs host split sizes too: under --ep the step is not run, and its
  collectives are the planner's (moekit/plan/comm.py), marked derived.
- Precision: fp32 throughout (no autocast), moekit's fp32 master weights and AdamW (the planner's
  --optimizer-precision fp32); the FP16 weights beside the article's ~30 GB per GPU are the same elements x 2 bytes.

Nothing is written to disk. Timing (2 shared cores): GPT-4 at 8 x 15 x 208 visits 6 ranks in 19-35 s; a
24,960-rank DeviceMesh takes ~1 s to build on the fake backend (torch 2.14 splits groups lazily).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from moekit.config import ModelConfig
from moekit.parallel.mesh import DistEnv, ParallelDims

FP32 = 4


@dataclass
class RankReport:
    """What one rank of the layout holds and sends, measured (see the module docstring)."""

    rank: int
    pp_rank: int
    dp_rank: int
    tp_rank: int
    role: str  # why this rank is distinct, e.g. "first stage, fullest ZeRO-1 rank"
    last: bool  # the last pipeline stage (norm, lm_head, loss)
    layers: list[int]
    shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # (name, local shape, whole shape)
    weight_numel: int
    weights: int
    gradients: int
    optimizer: int
    optimizer_params: int  # parameter tensors whose AdamW state this rank holds
    activations_micro: int  # saved for the backward by one micro-batch's forward (0: not run)
    in_flight: int  # micro-batches a 1F1B stage holds at once
    collectives: dict[str, dict[str, float]]  # group -> kind -> payload bytes of one micro-batch + the step
    calls: dict[str, dict[str, int]]
    p2p_micro: int  # bytes one micro-batch sends to the next stage (and its gradient back)
    measured_step: bool  # False: the step was not run (expert parallelism), collectives are the planner's
    seconds: float

    @property
    def activations(self) -> int:
        return self.activations_micro * self.in_flight


@dataclass
class DryRun:
    cfg: ModelConfig
    dims: ParallelDims
    seq_len: int
    micro_batch: int
    microbatches: int  # per step per data rank
    recompute: str
    ranks: list[RankReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


# ---- which ranks differ ----------------------------------------------------------------------------------
def distinct_stages(pp: int) -> list[tuple[int, str]]:
    """The first stage (embedding), a middle one and the last (final norm, lm_head, loss); stages between the ends
    hold the same number of layers under check_pp's equal split, so one middle stage speaks for them all."""
    if pp == 1:
        return [(0, "the only stage")]
    out = [(0, "first stage")]
    if pp > 2:
        out.append((1, f"middle stage (as stages 1-{pp - 2})"))
    return out + [(pp - 1, "last stage")]


def global_rank(dims: ParallelDims, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
    """The mesh is rank-major ("pp", "dp_replicate", "dp_shard", "tp"), tp innermost (moekit/parallel/mesh.py)."""
    return (pp_rank * dims.dp + dp_rank) * dims.tp + tp_rank


# ---- one rank ----------------------------------------------------------------------------------------------
class _Balanced:
    """Per-expert row counts for `Experts.forward`'s host-side split: the kernel only calls `.tolist()`."""

    def __init__(self, counts: list[int]):
        self.counts = counts

    def tolist(self) -> list[int]:
        return self.counts


def _balanced_counts(experts: nn.Module, args: tuple) -> tuple:
    x_ND, _ = args
    n, e = x_ND.shape[0], experts.n_expert
    return x_ND, _Balanced([n // e + (i < n % e) for i in range(e)])


def _join(world: int, rank: int) -> None:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    _clear_dtensor_caches()


def _clear_dtensor_caches() -> None:
    """DTensor caches sharding decisions (in Python and in its C++ fast path) and redistribution plans keyed by
    meshes, and a DeviceMesh compares equal by its ranks alone: after re-joining as another rank, a cached decision
    names the previous world's groups ("Could not resolve the process group"). Cleared with
    torch.distributed.tensor.debug's helpers (and the planner's cache, torch 2.14, where it exists)."""
    from torch.distributed.tensor import _redistribute, debug

    debug._clear_sharding_prop_cache()
    getattr(_redistribute._gen_transform_infos, "cache_clear", lambda: None)()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def _storage_key(t: torch.Tensor) -> int:
    return _local(t).untyped_storage()._cdata


def measure_rank(cfg: ModelConfig, dims: ParallelDims, pp_rank: int, dp_rank: int, tp_rank: int, *, seq_len: int,
                 micro_batch: int, microbatches: int, recompute: str, role: str, run_step: bool = True
                 ) -> tuple[RankReport, list[float] | None]:
    """Join the fake world as this rank, build and parallelize its stage, run one micro-batch and the optimizer step.
    Returns the report and, under ZeRO-1, every data rank's partition size in elements (to pick the distinct ones)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from moekit.model.transformer import Transformer
    from moekit.parallel.collectives import CollectiveCounter, held_bytes
    from moekit.parallel.data import optimizer_state_bytes, shard_optimizer
    from moekit.parallel.parallelize import Layout, parallelize
    from moekit.parallel.stages import split_model, stage_layers
    from moekit.parallel.tensor import loss_context
    from moekit.train.config import TrainConfig
    from moekit.train.optim import build_optimizer

    t0 = time.perf_counter()
    rank = global_rank(dims, pp_rank, dp_rank, tp_rank)
    _join(dims.world_size, rank)
    try:
        layout = Layout.from_env(dims, DistEnv(rank, dims.world_size, 0, torch.device("cpu")))
        tc = TrainConfig(steps=1, recompute=recompute)
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            model = Transformer(cfg)
        # Sharding outside the mode (fake tensors keep it for their own ops): FSDP2 builds DeviceMeshes from real
        # rank tensors, which under the mode would be fake and have no values.
        shapes_whole = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
        raw, _ = split_model(model, [pp_rank], dims.pp)
        model = parallelize(raw, layout, recompute=recompute)
        shapes = [(n, tuple(_local(p).shape), shapes_whole[n]) for n, p in raw.named_parameters()]
        opt = shard_optimizer(build_optimizer(raw, tc), dims, layout.mesh)  # the trainer's, ZeRO-1 x TP included
        partition = None
        if dims.zero == 1 and dims.dp > 1:
            partition = [float(sum(p.numel() for g in part for p in g["params"]))
                         for part in opt._partition_parameters()]
        with mode:
            counter = CollectiveCounter(wait=True)
            act_micro, p2p, tied = 0, 0, None
            if run_step:
                for moe in raw.moe_layers():
                    moe.experts.register_forward_pre_hook(_balanced_counts, prepend=True)
                first, last = pp_rank == 0, pp_rank == dims.pp - 1
                B, T = micro_batch, seq_len
                t_local = T // dims.tp if dims.tp > 1 and layout.sequence_parallel else T
                x = (torch.zeros(B, T, dtype=torch.long) if first else
                     torch.empty(B, t_local, cfg.d_model, requires_grad=True))
                positions_BT = torch.arange(T).expand(B, T)
                targets_BT = torch.zeros(B, T, dtype=torch.long) if last else None
                params = {_storage_key(p) for p in raw.parameters()}
                saved: dict[int, int] = {}

                def pack(t: torch.Tensor):
                    key = _storage_key(t)
                    if key not in params:
                        loc = _local(t)
                        saved[key] = max(saved.get(key, 0), loc.numel() * loc.element_size())
                    return t

                with counter, loss_context(layout.loss_parallel and dims.tp > 1):
                    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                        out = model(x, targets_BT, positions_BT=positions_BT)
                    act_micro = sum(saved.values())
                    # What crosses a stage boundary: the output sent on (the input received, on the last stage).
                    edge = x if last else out
                    p2p = _local(edge).numel() * _local(edge).element_size() if dims.pp > 1 else 0
                    if last:
                        out.loss.backward()
                    else:
                        out.backward(torch.empty_like(out))
                    before = len(counter.calls)
                    if _sync_tied_embedding(raw, dims, pp_rank, dp_rank, tp_rank):
                        tied = range(before, len(counter.calls))
                    opt.step()
            else:  # gradients as the backward would leave them, for the optimizer state
                for p in raw.parameters():
                    p.grad = torch.zeros_like(p)
                with counter:
                    opt.step()
            held = held_bytes(model)
            optimizer = optimizer_state_bytes(opt)
            local_opt = getattr(opt, "optim", opt)
            n_opt = len(local_opt.state)
        collectives: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        calls: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        names = _group_names(dims)
        for i, c in enumerate(counter.calls):
            group = "embedding" if tied is not None and i in tied else names.get(c.group_size, f"{c.group_size} ranks")
            collectives[group][c.kind] += c.payload
            calls[group][c.kind] += 1
        layers = list(stage_layers(cfg.n_layer, dims.pp)[pp_rank])
        in_flight = min(microbatches, dims.pp - pp_rank)
        report = RankReport(
            rank=rank, pp_rank=pp_rank, dp_rank=dp_rank, tp_rank=tp_rank, role=role, last=pp_rank == dims.pp - 1,
            layers=layers, shapes=shapes,
            weight_numel=sum(math.prod(s[1]) for s in shapes), weights=held["weights"],
            gradients=held["weights"] if not run_step else held["gradients"], optimizer=optimizer,
            optimizer_params=n_opt, activations_micro=act_micro, in_flight=in_flight,
            collectives={g: dict(v) for g, v in collectives.items()}, calls={g: dict(v) for g, v in calls.items()},
            p2p_micro=p2p if dims.pp > 1 else 0, measured_step=run_step, seconds=time.perf_counter() - t0)
        return report, partition
    finally:
        dist.destroy_process_group()


def _sync_tied_embedding(raw: nn.Module, dims: ParallelDims, pp_rank: int, dp_rank: int, tp_rank: int):
    """The pipeline's tied-embedding all-reduce (pipeline.py `sync_tied_grads`) on the first or last stage, over
    the two ranks of this (data, tensor) coordinate; False when this rank has none. The group is made here: the real
    pipeline makes one per coordinate at start-up."""
    import torch.distributed as dist

    if dims.pp == 1 or not raw.cfg.tie_embeddings or pp_rank not in (0, dims.pp - 1):
        return False
    w = raw.tok_emb.weight if pp_rank == 0 else raw.lm_head.weight
    ends = [global_rank(dims, s, dp_rank, tp_rank) for s in (0, dims.pp - 1)]
    dist.all_reduce(_local(w.grad), group=dist.new_group(ends))
    return True


def _group_names(dims: ParallelDims) -> dict[int, str]:
    """A collective's group by its size: the layout's groups have distinct sizes in the layouts checked (a size
    shared by two groups is named after the first: tp, then dp, then ep, edp)."""
    out: dict[int, str] = {}
    for name, size in (("tp", dims.tp), ("dp", dims.dp), ("ep", dims.ep), ("edp", dims.edp), ("pp", dims.pp)):
        if size > 1:
            out.setdefault(size, name)
    return out


# ---- the layout ----------------------------------------------------------------------------------------------
def dry_run(cfg: ModelConfig, dims: ParallelDims, *, seq_len: int | None = None, micro_batch: int = 1,
            batch_tokens: float = 60e6, recompute: str = "none") -> DryRun:
    """Measure every distinct rank of `dims` for `cfg` (module docstring). batch_tokens: tokens per optimizer step
    (default the article's 60M, SPEC section 3), which sets the micro-batches per step and the stages' in-flight
    micro-batches."""
    dims.check_model(cfg)
    seq_len = seq_len or cfg.max_seq_len
    if dims.tp > 1 and seq_len % dims.tp:
        raise ValueError(f"--seq-len {seq_len}: sequence parallelism needs a multiple of --tp {dims.tp}")
    m = max(1, math.ceil(batch_tokens / (dims.dp * micro_batch * seq_len)))
    t0 = time.perf_counter()
    out = DryRun(cfg, dims, seq_len, micro_batch, m, recompute)
    run_step = dims.ep == 1
    if not run_step:
        out.notes.append("--ep: the step is not run (the all-to-all needs host split sizes fake tensors lack); "
                         "collectives are the planner's (derived)")
    out.notes.append("MoE routing balanced for the host-side expert split (shapes and bytes do not depend on it "
                     "without capacity dropping); fp32 weights, gradients, AdamW and activations, no autocast")
    for stage, where in distinct_stages(dims.pp):
        report, partition = measure_rank(cfg, dims, stage, 0, 0, seq_len=seq_len, micro_batch=micro_batch,
                                         microbatches=m, recompute=recompute, role=where, run_step=run_step)
        if partition is None:
            out.ranks.append(report)
            continue
        # ZeRO-1: the fullest and the emptiest data rank of the real partition (rank 0 may be either).
        fullest = max(range(len(partition)), key=partition.__getitem__)
        emptiest = min(range(len(partition)), key=partition.__getitem__)
        for dp_rank, which in ((fullest, "fullest"), (emptiest, "emptiest")):
            if dp_rank == 0:
                report.role = f"{where}, {which} ZeRO-1 rank"
                out.ranks.append(report)
                continue
            r, _ = measure_rank(cfg, dims, stage, dp_rank, 0, seq_len=seq_len, micro_batch=micro_batch,
                                microbatches=m, recompute=recompute, role=f"{where}, {which} ZeRO-1 rank",
                                run_step=run_step)
            out.ranks.append(r)
    out.seconds = time.perf_counter() - t0
    return out


__all__ = ["DryRun", "RankReport", "distinct_stages", "dry_run", "global_rank", "measure_rank"]
