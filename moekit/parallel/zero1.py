"""ZeRO-1 over tensor-parallel (DTensor) weights: `--zero 1 --tp T` (and with --pp), GPT-4's layout (SPEC section 3).

    opt = shard_optimizer(build_optimizer(model, tc), dims, mesh)      # moekit/parallel/data.py picks this class
    opt.step(); opt.zero_grad()                                         # the trainer's calls, unchanged

`torch.distributed.optim.ZeroRedundancyOptimizer` partitions whole *plain* tensors over its group (each rank steps
the ones it owns) and broadcasts each updated one from its owner (`param.data`: torch/distributed/optim/
zero_redundancy_optimizer.py `_broadcast_params_from_rank`); it cannot take a DTensor. But a DTensor parameter's
local shard is a plain tensor, and the data ranks of one tensor coordinate (this rank's "dp_replicate" group) hold
the very same shards: so each tensor rank runs its own ZeRO-1 over its data ranks, on stand-ins
`nn.Parameter(p.to_local().detach())` that share each shard's storage. When the owner's AdamW updates a stand-in and
ZeroRedundancyOptimizer broadcasts it, the DTensor parameter changes in place on every data rank. Each rank holds
the AdamW state of the local shards it owns, ~1/dp of its tensor rank's (whole shards, sorted-greedy:
moekit.plan.shards `zero1_partition` models exactly this). Megatron-LM's distributed optimizer shards the same way:
each tensor rank its own shards over its data-parallel group.

This module imports torch.distributed.optim (~0.3-0.5 s), which a one-process run never needs: data.py imports it
only when it shards an optimizer.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor


def zero_arguments(opt: torch.optim.Optimizer) -> tuple[dict, list[dict]]:
    """`opt`'s hyper-parameters and param groups, as ZeroRedundancyOptimizer passes them on to its class."""
    accepted = set(inspect.signature(type(opt).__init__).parameters) - {"self", "params"}
    defaults = {k: v for k, v in opt.defaults.items() if k in accepted}
    groups = [{k: v for k, v in g.items() if k == "params" or k in accepted} for g in opt.param_groups]
    return defaults, groups


class ShardedZero1(ZeroRedundancyOptimizer):
    """ZeroRedundancyOptimizer over stand-ins of the DTensor parameters' local shards (module docstring).

    The gradients are the model's: averaged over the data ranks by data.py `apply_replicate`'s hooks and clipped on
    the DTensors; `step` hands each stand-in its parameter's local gradient (a view, no copy), and `zero_grad`
    clears both. The optimizer (class, moekit's weight-decay param groups, hyper-parameters) is `opt`'s, over the
    stand-ins in the same groups and order; `param_groups` is ZeroRedundancyOptimizer's (the trainer sets "lr"
    there every step; ZeRO passes it to its local optimizer before stepping). `param_of(stand_in)` is the model's
    parameter: checkpoints name the state by it (moekit/train/dist_checkpoint.py).
    """

    def __init__(self, opt: torch.optim.Optimizer, group) -> None:
        defaults, groups = zero_arguments(opt)
        self._pairs: list[tuple[nn.Parameter, torch.Tensor]] = []
        for g in groups:
            stand_ins = []
            for p in g["params"]:
                stand_ins.append(nn.Parameter(_local(p).detach(), requires_grad=p.requires_grad))
                self._pairs.append((stand_ins[-1], p))
            g["params"] = stand_ins
        self._params = {id(s): p for s, p in self._pairs}
        super().__init__(groups, optimizer_class=type(opt), process_group=group, **defaults)

    def param_of(self, stand_in: torch.Tensor) -> torch.Tensor:
        return self._params[id(stand_in)]

    def step(self, closure=None, **kwargs):
        for s, p in self._pairs:
            s.data = _local(p).detach()  # the same storage; and if a load replaced the shard, the new one
            s.grad = None if p.grad is None else _local_grad(p)
        return super().step(closure, **kwargs)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for _, p in self._pairs:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def _local_grad(p: torch.Tensor) -> torch.Tensor:
    """The local part of `p`'s gradient in `p`'s own placements (a gradient left Partial would be unreduced)."""
    g = p.grad
    if not isinstance(g, DTensor):
        return g
    if tuple(g.placements) != tuple(p.placements):
        g = g.redistribute(p.device_mesh, p.placements)
    return g.to_local()


__all__ = ["ShardedZero1", "zero_arguments"]
