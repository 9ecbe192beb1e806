"""`parallelize(model, layout)`: every parallelism of a run applied to a built model, in torchtitan's order.

    layout = Layout.from_env(dims, env)                    # or Layout.single(device): a world of one
    model = parallelize(model, layout, recompute="selective", compile=False)
    raw = unwrap(model)                                    # the Transformer under a DDP wrapper

The order is torchtitan's (`parallelize_llama`): tensor (+ sequence) parallel -> expert parallel -> activation
checkpointing -> compile -> data parallel (FSDP2 last, so it shards what the others built). A world of one runs the same
function and gets back the model itself (with recomputation and compilation if asked).

Activation recomputation (`--recompute`, Megatron's names; Korthikanti et al. 2022):
- "full": each block keeps only its input; its whole forward runs again in the backward (8ND FLOPs
  instead of 6ND, the least memory).
- "selective": each block recomputes its cheap elementwise work (norms, activations, RoPE, softmax
  statistics) and keeps the outputs of its matmuls and attention, which are expensive to recompute
  (torchtitan's op-level selective checkpointing policy; the FLOPs stay ~6ND).
- "none": keep everything.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from moekit.parallel.data import apply_data_parallel, unwrap
from moekit.parallel.mesh import DistEnv, ParallelDims, build_expert_mesh, build_mesh, dp_mesh

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from moekit.parallel.stages import PipelineConfig

RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class Layout:
    """A run's parallel layout: the dimensions, the one mesh over them (None for a world of one), this process."""

    dims: ParallelDims
    mesh: DeviceMesh | None
    env: DistEnv
    sequence_parallel: bool = True  # with tp > 1 (Megatron's SP: norms on sequence shards)
    loss_parallel: bool = True  # with tp > 1: the cross-entropy on vocabulary-sharded logits
    expert_mesh: DeviceMesh | None = None  # with ep > 1: the same ranks as ("pp", "edp", "ep", "tp")
    pipeline: PipelineConfig | None = None  # with pp > 1: schedule, micro-batches, stages per rank (pipeline.py)

    @classmethod
    def single(cls, device: torch.device) -> Layout:
        return cls(ParallelDims(), None, DistEnv(0, 1, 0, device))

    @classmethod
    def from_env(cls, dims: ParallelDims, env: DistEnv, **kw) -> Layout:
        return cls(dims, build_mesh(dims, env.device.type), env,
                   expert_mesh=build_expert_mesh(dims, env.device.type), **kw)

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    @property
    def dp_group(self):
        """The process group over which batches are split and statistics summed (None: no data parallelism)."""
        return dp_mesh(self.mesh).get_group() if self.mesh is not None and self.dims.dp > 1 else None

    def describe(self) -> str:
        return self.dims.describe()


def parallelize(model: nn.Module, layout: Layout, *, recompute: str = "none", compile: bool = False) -> nn.Module:
    """Apply the layout's parallelisms, recomputation and compilation to `model` (see the module docstring);
    returns the module to run (a DDP wrapper, or the model itself)."""
    if recompute not in RECOMPUTE:
        raise ValueError(f"--recompute {recompute!r}: choose one of {', '.join(RECOMPUTE)}")
    dims, mesh = layout.dims, layout.mesh
    if dims.tp > 1:
        from moekit.parallel.tensor import apply_tensor_parallel

        apply_tensor_parallel(model, mesh["tp"], sequence_parallel=layout.sequence_parallel,
                              loss_parallel=layout.loss_parallel, shard_experts=dims.ep == 1)
    if dims.ep > 1:  # after tensor parallel, which left the experts to it (one ("ep", "tp") placement)
        from moekit.parallel.expert import apply_expert_parallel

        apply_expert_parallel(model, layout.expert_mesh)
    if recompute != "none":
        apply_recompute(model, recompute)
    if compile:  # per block: the 8..120 identical blocks share one compiled graph (torchtitan)
        for block in model.blocks.values():
            block.compile()
    if layout.dp_group is not None:
        sum_router_counts(model, layout.dp_group)
    return apply_data_parallel(model, dims, mesh, layout.expert_mesh)


def sum_router_counts(model: nn.Module, group) -> None:
    """Make every MoE layer's router statistics global over the data-parallel ranks: the load-balancing f_e (one
    all-reduce of E + 1 numbers per layer and micro-batch; moekit/model/moe.py `load_balancing_loss` says why) and,
    with a capacity limit, the queue positions and the limit itself (an all-gather of K x E counts: the whole
    batch's tokens are dropped as in one process, `global_offsets`)."""
    import torch.distributed as dist

    size, rank = dist.get_world_size(group), dist.get_rank(group)

    def reduce(counts: torch.Tensor) -> torch.Tensor:
        counts = counts.detach().clone()
        dist.all_reduce(counts, group=group)
        return counts

    def gather(counts_KE: torch.Tensor) -> tuple[torch.Tensor, int]:
        all_RK_E = counts_KE.new_empty(size * counts_KE.shape[0], counts_KE.shape[1])  # ranks along dimension 0
        dist.all_gather_into_tensor(all_RK_E, counts_KE.detach().contiguous(), group=group)
        return all_RK_E.view(size, *counts_KE.shape), rank

    for moe in unwrap(model).moe_layers():
        moe.reduce_counts = reduce
        if moe.capacity_factor > 0:
            moe.gather_counts = gather


# ---- activation recomputation ------------------------------------------------------------------------------
def _keep_matmuls_policy():
    """Selective checkpointing: save the outputs of matmuls and attention, recompute everything else."""
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    keep = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.linear.default}
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention"):
        op = getattr(aten, name, None)
        if op is not None:
            keep.add(op.default)

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def apply_recompute(model: nn.Module, mode: str) -> None:
    """Checkpoint every block's forward (`mode` "full" or "selective"), in place. The blocks keep their names
    (no wrapper module), so state dicts and checkpoints are unchanged."""
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    def checkpointed(forward, *args, **kwargs):
        extra = {}
        if mode == "selective":
            extra["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _keep_matmuls_policy())
        return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)

    for block in model.blocks.values():
        block.forward = functools.partial(checkpointed, block.forward)


__all__ = ["RECOMPUTE", "Layout", "apply_recompute", "parallelize", "sum_router_counts"]
