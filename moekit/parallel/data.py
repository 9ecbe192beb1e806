"""Data parallelism applied to a built model from outside: DDP, ZeRO-1 and FSDP2 (`--zero 0|1|2|3`).

    dims = ParallelDims.from_flags(world, zero=3, cfg=cfg); mesh = build_mesh(dims, "cpu")
    model = apply_data_parallel(model, dims, mesh)          # the model itself for a world of one
    opt = shard_optimizer(build_optimizer(unwrap(model), tc), dims, mesh)   # moekit's AdamW; ZeRO-1 wraps it
    with gradient_sync(model, last_micro_batch):             # grad accumulation: reduce on the last one only
        model(x_BT, y_BT).loss.backward()
    grad_norm = clip_grad_norm(model.parameters(), 1.0)      # global norm, plain tensors and DTensors alike
    opt.step()

torchtitan's order (parallelize_llama): tensor parallel -> activation checkpointing -> compile -> FSDP last, so
`apply_data_parallel` is the last function applied. The modes (mesh.py has the table):
- DDP (`torch.nn.parallel.DistributedDataParallel`): gradients all-reduced (averaged) over "dp_replicate".
- ZeRO-1: DDP for the gradients + `torch.distributed.optim.ZeroRedundancyOptimizer`, which gives each rank whole
  parameters to update (sorted-greedy by size, so ~1/world of the AdamW state each) and broadcasts the result.
  With --tp (and --pp): `apply_replicate`'s gradient averaging + `ShardedZero1`, ZeroRedundancyOptimizer over
  each tensor rank's local shards, partitioned over the data ranks holding the same shards.
- FSDP2 (`torch.distributed.fsdp.fully_shard`, public from torch 2.6): every block, then the root (embeddings,
  final norm, lm_head: one group, since a tied lm_head shares its weight with the embedding). Parameters become
  Shard(0) DTensors; each block's forward all-gathers its weights into plain tensors, so the MoE's hand-written
  autograd kernel (moekit/model/grouped.py) sees ordinary (E, out, in) tensors, and the backward reduce-scatters
  (averages) the gradients. zero=2 keeps the gathered weights to the backward (reshard_after_forward=False);
  zero=3 frees them after each block's forward and gathers again for its backward. The optimizer built after
  sharding holds only the local shards' state: AdamW is elementwise, so sharded AdamW is exact.

Every mode averages gradients over the data-parallel ranks: with equal-sized batch slices and a loss that is a
mean over tokens, that average is the gradient of one process's whole batch. Checked by
tests/parallel/test_data_parallel.py (run: `.venv/bin/python -m pytest tests/parallel/test_data_parallel.py`).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from moekit.parallel.mesh import ParallelDims

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

FSDP2_MIN_TORCH = (2, 6)  # fully_shard left torch.distributed._composable.fsdp for torch.distributed.fsdp in 2.6


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def has_fsdp2() -> bool:
    return torch_version() >= FSDP2_MIN_TORCH


# ---- applying it ---------------------------------------------------------------------------------------
def apply_data_parallel(model: nn.Module, dims: ParallelDims, mesh: DeviceMesh | None,
                        expert_mesh: DeviceMesh | None = None) -> nn.Module:
    """`model` with `dims.zero`'s data parallelism over the mesh's data-parallel ranks; the model itself when
    there are none (a world of one, or tensor parallelism only). Use the returned module for forward/backward and
    `unwrap(...)` of it for the model's own attributes (DDP wraps, FSDP2 changes the class in place).

    With expert parallelism (`expert_mesh`, moekit/parallel/expert.py), the experts' gradients are reduced over
    expert_mesh["edp"], the data ranks holding the same experts, and divided by the whole dp: see expert.py."""
    if mesh is None or dims.dp == 1:
        return model
    experts = None
    if expert_mesh is not None:
        from moekit.parallel.expert import expert_parameters

        experts = (expert_mesh["edp"], expert_parameters(model))
    if dims.zero >= 2:
        return apply_fsdp(model, mesh["dp_shard"], reshard_after_forward=dims.zero == 3, experts=experts)
    if dims.tp > 1 or experts is not None:
        # --zero 1 with --tp: the same gradient averaging; shard_optimizer then shards the AdamW state of each
        # tensor rank's shards over its data ranks (ShardedZero1). --ep with --zero 1 is refused by ParallelDims.
        return apply_replicate(model, mesh["dp_replicate"], experts=experts)
    return apply_ddp(model, mesh["dp_replicate"])


def apply_replicate(model: nn.Module, dp_mesh: DeviceMesh,
                    experts: tuple[DeviceMesh, set[int]] | None = None) -> nn.Module:
    """DDP for a tensor- or expert-parallel model (--zero 0, and --zero 1 with `ShardedZero1` as its optimizer):
    every gradient averaged over the data-parallel ranks as it is
    complete; `experts` = (the expert-data-parallel mesh, ids of the expert parameters): those are summed over that
    mesh instead, and divided by the whole data-parallel degree (moekit/parallel/expert.py says why).

    DistributedDataParallel buckets plain tensors and cannot take DTensor parameters; here each parameter's
    post-accumulate-grad hook (torch >= 2.1) all-reduces the local part of its gradient (each tensor rank's own
    shard) over the "dp_replicate" ranks, in place, after the step's last micro-batch. The same arithmetic as
    DDP, without its bucketing and overlap: a tensor-parallel layout (tp x dp) for correctness on CPUs and
    reviewable code, where large GPU runs would use FSDP2 (--zero 2/3), as torchtitan does. In place on `model`,
    which gains FSDP2's `set_requires_gradient_sync(bool)` (for `gradient_sync`, gradient accumulation) and
    `reduce_gradients()`: the same averaging, now, for a caller that ran its micro-batches with the sync off and
    cannot tell which backward is the last (a pipeline schedule: moekit/parallel/pipeline.py). Each gradient must be
    averaged once per step: the expert gradients' division by dp is not undone by a second all-reduce."""
    import torch.distributed as dist

    size, sync = dp_mesh.size(), {"on": True}
    expert_group, expert_ids = (experts[0].get_group(), experts[1]) if experts else (None, set())

    def average(group):
        alone = dist.get_world_size(group) == 1  # e.g. experts held by one data rank (--ep = dp): nothing to sum

        def hook(p: torch.Tensor) -> None:
            if sync["on"] and p.grad is not None:
                g = p.grad.to_local() if _is_dtensor(p.grad) else p.grad
                g.div_(size)
                if not alone:
                    dist.all_reduce(g, group=group)

        return hook

    hooks = []
    for p in model.parameters():
        if p.requires_grad:
            hooks.append((p, average(expert_group if id(p) in expert_ids else dp_mesh.get_group())))
            p.register_post_accumulate_grad_hook(hooks[-1][1])

    def reduce_gradients() -> None:
        on, sync["on"] = sync["on"], True
        try:
            for p, hook in hooks:
                hook(p)
        finally:
            sync["on"] = on

    model.set_requires_gradient_sync = lambda on: sync.__setitem__("on", bool(on))
    model.reduce_gradients = reduce_gradients
    return model


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh) -> nn.Module:
    """DistributedDataParallel over a 1-D mesh (ZeRO-0; ZeRO-1 adds `shard_optimizer`).

    broadcast_buffers=False: moekit's only buffer is the RoPE frequency table, identical on every rank and never
    updated, so DDP's per-forward buffer broadcast would be pure traffic. A device-type mesh on CUDA sets
    device_ids, as the DDP docs ask for single-device modules.
    """
    from torch.nn.parallel import DistributedDataParallel

    # DDP gathers flat buckets of plain tensors: DTensor parameters (tensor parallel) need FSDP2 or composable
    # replicate instead (torchtitan refuses DDP with > 1-D parallelism for the same reason).
    if any(_is_dtensor(p) for p in model.parameters()):
        raise ValueError("--zero 0/1 (DDP) cannot wrap tensor-parallel (DTensor) weights yet: use --zero 2 or 3")
    device = next(model.parameters()).device
    device_ids = [device.index] if device.type == "cuda" else None
    # torch 2.14 renamed broadcast_buffers to forward_sync_buffers (the buffers are still checked equal at init).
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers": False} if renamed else {"broadcast_buffers": False}
    return DistributedDataParallel(model, process_group=dp_mesh.get_group(), device_ids=device_ids, **no_sync)


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, reshard_after_forward: bool,
               mp_policy: object | None = None, experts: tuple[DeviceMesh, set[int]] | None = None) -> nn.Module:
    """FSDP2 `fully_shard` on every block, then the root (torchtitan `apply_fsdp`), in place.

    experts = (the expert-data-parallel mesh, ids of the expert parameters): each MoE layer's experts are a unit
    of their own first, sharded over that mesh with the gradients divided by the whole data-parallel degree
    (torchtitan's `set_gradient_divide_factor`; moekit/parallel/expert.py), so the block's unit leaves them out.

    mp_policy: a `torch.distributed.fsdp.MixedPrecisionPolicy` (e.g. bf16 weights for compute, fp32 gradient
    reduction, torchtitan's default); None = the weights' own dtype (moekit's bf16 runs use autocast instead).
    The root keeps its weights gathered after the forward (fully_shard's own heuristic: its backward starts at
    once), so only the blocks differ between zero=2 and zero=3.
    """
    if not has_fsdp2():
        raise ValueError(f"--zero 2/3 (FSDP2) needs torch >= 2.6 (fully_shard in torch.distributed.fsdp); this is "
                         f"torch {torch.__version__}: upgrade torch, or use --zero 0 or 1")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    config = {"mesh": dp_mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for block in model.blocks.values():
        if experts is not None and hasattr(block.mlp, "experts"):
            unit = fully_shard(block.mlp.experts, mesh=experts[0], mp_policy=config["mp_policy"],
                               reshard_after_forward=reshard_after_forward)
            unit.set_gradient_divide_factor(float(dp_mesh.size()))
            if dp_mesh.device_type == "cpu" and experts[0].size() > 1:
                # gloo has no PREMUL_SUM: sum, then divide (FSDP2's own fallback). Not on a one-rank mesh: there
                # torch 2.14's foreach_reduce divides by the factor in its no-communication branch and again as
                # the fallback's post-division (gradients 1/dp too small; caught by the grad-norm parity test).
                unit.set_force_sum_reduction_for_comms(True)
        fully_shard(block, reshard_after_forward=reshard_after_forward, **config)
    fully_shard(model, **config)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model under a DDP wrapper (nanoGPT's `raw_model`); FSDP2 and plain models are themselves."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


# ---- the optimizer ----------------------------------------------------------------------------------------
def shard_optimizer(opt: torch.optim.Optimizer, dims: ParallelDims, mesh: DeviceMesh | None) -> torch.optim.Optimizer:
    """ZeRO-1: the same optimizer (class, moekit's weight-decay param groups, hyper-parameters) with its state
    sharded over the "dp_replicate" ranks by `torch.distributed.optim.ZeroRedundancyOptimizer`; `opt` itself for
    every other mode (under FSDP2 the optimizer built on the sharded parameters is sharded already).

    Build `opt` on the data-parallel model's parameters before its first step (its state is still empty):
    moekit.train.optim.build_optimizer(unwrap(model), tc). Taking a built optimizer, rather than a TrainConfig,
    keeps the one definition of moekit's AdamW (param groups, fused kernel) in train/, and parallel/ below it.
    """
    if mesh is None or dims.zero != 1 or dims.dp_replicate == 1:
        return opt
    if any(opt.state.values()):
        raise ValueError("shard_optimizer needs an optimizer that has not stepped yet (its state would be lost)")
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from moekit.parallel.zero1 import ShardedZero1, zero_arguments

    group = mesh["dp_replicate"].get_group()  # this rank's data ranks: those of its tensor (and pipeline) coordinate
    if any(_is_dtensor(p) for g in opt.param_groups for p in g["params"]):
        return ShardedZero1(opt, group)
    defaults, groups = zero_arguments(opt)
    return ZeroRedundancyOptimizer(groups, optimizer_class=type(opt), process_group=group, **defaults)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state (AdamW's exp_avg, exp_avg_sq, step) this rank holds: its local shards only."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    local = opt.optim if isinstance(opt, ZeroRedundancyOptimizer) else opt
    total = 0
    for state in local.state.values():
        for t in state.values():
            if isinstance(t, torch.Tensor):
                t = t.to_local() if _is_dtensor(t) else t
                total += t.numel() * t.element_size()
    return total


# ---- one step's pieces ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Run forward and backward inside this; with enabled=False the gradients stay local (accumulated), to be
    reduced by the backward of the step's last micro-batch: DDP's `no_sync`, FSDP2's
    `set_requires_gradient_sync(False)`. A plain model has nothing to skip."""
    from torch.nn.parallel import DistributedDataParallel

    if enabled:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the gradients to global norm `max_norm` and return the norm before clipping (a plain tensor).

    DTensor gradients (FSDP2's shards, tensor- and expert-parallel weights) have their norm reduced over their
    mesh by `get_total_norm`; gradients on different meshes (expert parallelism puts the experts on its own) are
    normed group by group and the squares summed, as torchtitan's `clip_grad_norm_` does for its expert weights.
    The norm is made a plain (replicated) tensor before scaling, so every mode returns the same kind of value and
    scales by the same factor on every rank. DDP/ZeRO-1 gradients are plain all-reduced tensors (the same on every
    rank), so the local norm is the global one.
    """
    params = [p for p in parameters if p.grad is not None]
    if not hasattr(torch.nn.utils, "get_total_norm"):  # torch < 2.6: no DTensor gradients here (no FSDP2)
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    groups = _by_mesh(params)
    norms = []
    for group in groups:
        norm = torch.nn.utils.get_total_norm([p.grad for p in group])
        norms.append(norm.full_tensor() if _is_dtensor(norm) else norm)
    total = norms[0] if len(norms) == 1 else torch.stack(norms).square().sum().sqrt()
    for group in groups:
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def clip_grads_with_norm(parameters: Iterable[torch.Tensor], max_norm: float, total: torch.Tensor) -> None:
    """torch's clip_grads_with_norm_ over gradients that may live on several meshes (its foreach kernels take one)."""
    for group in _by_mesh([p for p in parameters if p.grad is not None]):
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)


def _by_mesh(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The parameters grouped by their gradient's DTensor mesh (plain tensors in a group of their own)."""
    groups: dict[object, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault(p.grad.device_mesh if _is_dtensor(p.grad) else None, []).append(p)
    return list(groups.values())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight whole, as plain CPU tensors, on every rank (a collective: all ranks must call it). For
    exporting and for tests; distributed checkpoints save the shards instead."""
    out = {}
    for name, t in unwrap(model).state_dict().items():
        out[name] = (t.full_tensor() if _is_dtensor(t) else t).detach().cpu()
    return out


def _is_dtensor(t: object) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without torch.distributed: no DTensors anywhere
        return False
    return isinstance(t, DTensor)
