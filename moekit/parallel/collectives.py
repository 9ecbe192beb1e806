"""What the planner's per-rank figures are checked against: the bytes a rank holds and the bytes its collectives carry.

    with CollectiveCounter() as comm:            # every collective this rank issues inside, counted (and timed)
        trainer.train_step()
    comm.payload_by_kind()                       # {"all_reduce": bytes, "all_gather": ..., ...}
    held_bytes(model, opt)                       # {"weights": ..., "gradients": ..., "optimizer": ...} on this rank

`moekit.plan.comm` predicts both from the configuration alone; tests/parallel/test_plan_bytes.py and
bench/parallel_train.py compare. This module imports torch, which is why it is not in moekit/plan (pure functions
over the configuration, DESIGN.md), but beside it, as moekit/bench_hardware.py measures the hardware table's entry.

How the collectives are caught: one `TorchDispatchMode` (torch.utils._python_dispatch), PyTorch's own way of
watching them (`torch.distributed.tensor.debug.CommDebugMode` counts calls the same way). Every collective reaches
the dispatcher as an operator, whoever issued it: `torch.distributed.all_reduce`/`broadcast` (the trainer's
statistics, ZeRO-1's parameter broadcasts, DDP x TP's gradient hooks) as `c10d.allreduce_`, `c10d.broadcast_`;
FSDP2's all-gathers and reduce-scatters (`dist.all_gather_single`/`reduce_scatter_single` in torch 2.14,
`all_gather_into_tensor` before) as `c10d._allgather_base_`/`_reduce_scatter_base_`; DTensor's redistributions
(tensor parallelism) as the functional collectives `_c10d_functional.*`; and DistributedDataParallel's C++ reducer,
whose `ProcessGroup::allreduce` dispatches `c10d.allreduce_` too (the mode is thread-local state, which autograd
carries into the backward). Monkeypatching the Python functions would miss the C++ callers and break whenever torch
renames one (2.14 did); the operators are the stable seam. tests/parallel/test_plan_bytes.py checks DDP's buckets
independently with a communication hook (`register_comm_hook`).

Bytes are the *payload*: the whole logical tensor of a collective, the same on every rank: all-reduce and
broadcast the tensor, all-gather its gathered output, reduce-scatter its unreduced input, all-to-all its input.
What a ring algorithm puts on one rank's link follows from it (`moekit.plan.comm.WIRE_FACTOR`, nccl-tests'
"bus bandwidth" factors). Inside the counter every collective is waited on at once, so `seconds` is the time the
rank spends in communication; that removes the overlap of communication with computation (DDP's bucketed
all-reduce during the backward, FSDP2's prefetch), which gloo on a shared CPU barely has: the benchmark reports
the step time with and without the counter.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all", "p2p")
P2P = "p2p"  # a pipeline's send or receive: counted, never waited on here (its peer may post it later)


def _operators() -> dict:
    """operator overload packet -> (kind, which argument holds the payload: an index into the arguments, or
    "out" for the returned tensor)."""
    c10d, fn = torch.ops.c10d, torch.ops._c10d_functional
    # c10d's in-place operators take (tensors, group, ...), or (outputs, inputs, group, ...) for gathers, scatters
    # and all-to-all; the functional ones take the input first and return a new output.
    in_place = {
        "allreduce_": ("all_reduce", 0), "allreduce_coalesced_": ("all_reduce", 0), "broadcast_": ("broadcast", 0),
        "_allgather_base_": ("all_gather", 0), "allgather_": ("all_gather", 0),
        "allgather_into_tensor_coalesced_": ("all_gather", 0),
        "_reduce_scatter_base_": ("reduce_scatter", 1), "reduce_scatter_": ("reduce_scatter", 1),
        "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
        "alltoall_base_": ("all_to_all", 1), "alltoall_": ("all_to_all", 1),
        "send": (P2P, 0), "recv_": (P2P, 0),
    }
    functional = {
        "all_reduce": ("all_reduce", 0), "all_reduce_coalesced": ("all_reduce", 0), "broadcast": ("broadcast", 0),
        "all_gather_into_tensor": ("all_gather", "out"), "all_gather_into_tensor_coalesced": ("all_gather", "out"),
        "reduce_scatter_tensor": ("reduce_scatter", 0), "reduce_scatter_tensor_coalesced": ("reduce_scatter", 0),
        "all_to_all_single": ("all_to_all", 0),
    }
    ops = {getattr(c10d, n): v for n, v in in_place.items() if hasattr(c10d, n)}
    ops.update({getattr(fn, n): v for n, v in functional.items() if hasattr(fn, n)})
    if hasattr(torch.ops, "_c10d_functional_autograd"):
        ops[torch.ops._c10d_functional_autograd.all_to_all_single] = ("all_to_all", 0)
    return ops


def _tensor_bytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, list | tuple):
        return sum(_tensor_bytes(t) for t in x)
    return 0


@dataclass
class Collective:
    """One collective as this rank issued it."""

    kind: str  # one of KINDS
    op: str  # the dispatcher operator, e.g. "c10d._allgather_base_"
    payload: int  # bytes of the whole logical tensor (module docstring)
    group_size: int
    seconds: float  # issue + wait


class CollectiveCounter(TorchDispatchMode):
    """A dispatch mode that records every collective issued while it is active (module docstring).

    wait=True (default) waits for each collective before returning, so that `Collective.seconds` is the time
    spent communicating; the values computed are unchanged. One counter per rank and measured step."""

    def __init__(self, wait: bool = True) -> None:
        super().__init__()
        self.wait = wait
        self.calls: list[Collective] = []
        self._ops = _operators()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        kwargs = kwargs or {}
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor turn its op into local ops and collectives, then see those
        entry = self._ops.get(getattr(func, "_overloadpacket", None))
        if entry is None:
            return func(*args, **kwargs)
        t0 = time.perf_counter()
        out = func(*args, **kwargs)
        kind, where = entry
        if self.wait and kind != P2P:
            # A send or receive is not waited on: pipelining batches them (batch_isend_irecv), and waiting for one
            # before its partner is posted could deadlock the two stages; its time is not in `seconds`.
            _wait(out)
        seconds = time.perf_counter() - t0
        payload = _tensor_bytes(out if where == "out" else args[where])
        self.calls.append(Collective(kind, str(func._overloadpacket), payload, _group_size(args), seconds))
        return out

    # ---- summaries --------------------------------------------------------------------------------------
    def payload_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for c in self.calls:
            out[c.kind] += c.payload
        return dict(out)

    def calls_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for c in self.calls:
            out[c.kind] += 1
        return dict(out)

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.calls)


def _wait(out) -> None:
    """Wait for a collective's result: a c10d Work (in-place ops) or a functional collective's tensor(s)."""
    items = out if isinstance(out, list | tuple) else [out]
    for x in items:
        if isinstance(x, torch.Tensor):
            torch.ops._c10d_functional.wait_tensor(x)  # a functional collective's result (else a no-op)
        elif isinstance(x, list | tuple):
            _wait(x)
        elif hasattr(x, "wait"):
            x.wait()  # c10d's Work (a TorchScript object)


def _group_size(args) -> int:
    """The size of the group a collective runs over: its ProcessGroup argument (c10d operators), or the group
    its name resolves to (functional collectives end with the group's name)."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    for a in args:  # c10d operators: the group, boxed as a TorchScript object
        if isinstance(a, torch.ScriptObject) and str(a._type()).endswith("c10d.ProcessGroup"):
            return dist.ProcessGroup.unbox(a).size()
    return _resolve_process_group(args[-1]).size()


# ---- what a rank holds -------------------------------------------------------------------------------------
def held_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this rank holds of weights, gradients (where `.grad` exists) and optimizer state: the local shard of
    every DTensor (`to_local()`), each tensor once (a tied embedding is one parameter)."""
    from moekit.parallel.data import optimizer_state_bytes

    weights = grads = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        local = p.to_local() if hasattr(p, "to_local") else p
        weights += local.numel() * local.element_size()
        if p.grad is not None:
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            grads += g.numel() * g.element_size()
    return {"weights": weights, "gradients": grads, "optimizer": optimizer_state_bytes(opt) if opt else 0}


__all__ = ["KINDS", "Collective", "CollectiveCounter", "held_bytes"]
