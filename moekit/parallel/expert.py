"""Expert parallelism (`--ep E`): each MoE layer's experts split over E ranks, tokens sent to their expert's rank.

    layout = Layout.from_env(ParallelDims.from_flags(4, ep=2, zero=3, cfg=cfg), env)   # layout.expert_mesh
    apply_expert_parallel(model, layout.expert_mesh)       # in place, after tensor parallel, before FSDP2 / DDP

The experts' weights, stored (E, out, in), become DTensors sharded on dimension 0 over the "ep" ranks (and, with
--tp, on their hidden dimension F over "tp" as well: one 2-D ("ep", "tp") placement, torchtitan's expert-tensor
parallel), so rank j holds experts [j E/ep, (j+1) E/ep). The MoE layer itself is unchanged: it routes its own
tokens, sorts the assignments by expert and drops what exceeds the capacity, then calls `Experts.forward(x_ND,
counts_E)`. Around that call, forward hooks exchange the rows (Megatron-Core's `MoEAlltoAllTokenDispatcher`,
torchtitan's `ExpertParallel._token_dispatch/_token_combine`):

1. counts: an all-to-all of the E per-expert counts (each rank sends the E/ep counts of rank j's experts to j): a
   rank learns how many rows it will receive from every peer for each of its experts;
2. dispatch: `all_to_all_single` of the kept rows (uneven splits; dropped rows never leave: capacity is applied
   before the exchange, as Megatron does); the received rows, grouped by source, are permuted to expert order;
3. the local experts run on them with the ordinary grouped kernel (moekit/model/grouped.py);
4. combine: the inverse permutation, the reverse all-to-all, and zeros for the dropped rows.

Both exchanges are autograd functions (torch's `all_to_all_single_autograd`): the backward sends the gradients the
same way back. Under --tp every tensor rank holds the same tokens (the MoE's "partial domain",
moekit/parallel/tensor.py) and exchanges them with the expert ranks of its own tensor index; the experts' outputs are
then partial sums over F, which the MoE's tensor-parallel exit sums as before.

Gradients: with data ranks r = 1..dp each backpropagating dp x its share of the loss (moekit/train/loop.py), an
expert's gradient on its rank is the sum over the ep ranks of its group, and the dp / ep ranks holding the same
expert ("edp") each saw another group's tokens: expert gradients are summed over "edp" and divided by dp (the
whole data-parallel degree, torchtitan's `set_gradient_divide_factor`); every other parameter is averaged over all
dp ranks as without --ep (moekit/parallel/data.py).

Shape legend: N assignments sorted by expert (rows), D d_model, E experts, El = E / ep local experts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from moekit.model.moe import Experts


def expert_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters expert parallelism shards (every MoE layer's w1, w2, w3)."""
    return {id(p) for moe in model.moe_layers() for p in moe.experts.parameters()}


def apply_expert_parallel(model: nn.Module, expert_mesh: DeviceMesh) -> nn.Module:
    """Shard every MoE layer's experts over expert_mesh["ep"] (and ["tp"]) and route its rows there, in place.

    Call after tensor parallelism (which leaves the experts alone when there is --ep) and before data parallelism.
    The MoE layers take the sorted dispatch path from now on: the gather path (decode) reads every expert's weights
    on one rank and has no exchange.
    """
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    ep_tp = expert_mesh["ep", "tp"]
    ep, tp = ep_tp.size(0), ep_tp.size(1)
    for moe in model.moe_layers():
        if moe.n_expert % ep:
            raise ValueError(f"--ep {ep} must divide the {moe.n_expert} experts")
        experts = moe.experts
        for name, f_dim in (("w1", 1), ("w3", 1), ("w2", 2)):
            p = experts._parameters.get(name)
            if p is not None:
                placements = [Shard(0), Shard(f_dim) if tp > 1 else Replicate()]
                experts.register_parameter(name, nn.Parameter(distribute_tensor(p.detach(), ep_tp, placements)))
        _install_exchange(experts, expert_mesh["ep"].get_group(), ep)
        moe.dispatch = "sorted"
    return model


class _Exchange:
    """One layer's routing of rows to the expert ranks and back; what `forward`'s pre-hook learns (the splits, the
    permutation) the post-hook uses. Also counts the rows this rank sent and received (for the log)."""

    def __init__(self, group, ep: int, n_expert: int):
        self.group, self.ep, self.n_expert = group, ep, n_expert
        self.state: tuple | None = None
        self.sent = self.received = 0  # rows (token-expert assignments) since the last `take_exchange_counts`
        self.last_counts: torch.Tensor | None = None  # rows the local experts got in the last forward, (El,)

    def dispatch(self, module: Experts, args: tuple) -> tuple:
        import torch.distributed as dist
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        x_ND, counts_E = args
        El = self.n_expert // self.ep
        send_PE = counts_E.view(self.ep, El).to(torch.long)  # rows for peer p's local experts
        recv_PE = torch.empty_like(send_PE)
        dist.all_to_all_single(recv_PE.view(-1), send_PE.reshape(-1).contiguous(), group=self.group)
        in_splits, out_splits = send_PE.sum(1).tolist(), recv_PE.sum(1).tolist()  # one host sync for both
        kept = sum(in_splits)  # rows past the kept ones are dropped assignments: they stay here, as zeros
        x_recv = all_to_all_single_autograd(x_ND[:kept].contiguous(), out_splits, in_splits, self.group)
        # Received rows come grouped by source peer, each group sorted by local expert; the kernel wants them
        # sorted by local expert: a stable sort of each row's expert index (source order kept within an expert).
        expert_R = torch.arange(El, device=x_ND.device).repeat(self.ep).repeat_interleave(recv_PE.reshape(-1))
        order_R = torch.argsort(expert_R, stable=True)
        self.state = (order_R, in_splits, out_splits, x_ND.shape[0], kept)
        if _training_forward():
            self.sent += kept
            self.received += sum(out_splits)
        self.last_counts = recv_PE.sum(0)
        return x_recv.index_select(0, order_R), self.last_counts

    def combine(self, module: Experts, args: tuple, y_local: torch.Tensor) -> torch.Tensor:
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        order_R, in_splits, out_splits, n_rows, kept = self.state
        self.state = None
        inverse_R = torch.empty_like(order_R)
        inverse_R[order_R] = torch.arange(order_R.numel(), device=order_R.device)
        y_recv = y_local.index_select(0, inverse_R)  # back to the order the rows arrived in
        y_ND = all_to_all_single_autograd(y_recv.contiguous(), in_splits, out_splits, self.group)
        if kept < n_rows:
            y_ND = torch.cat([y_ND, y_ND.new_zeros(n_rows - kept, y_ND.shape[1])])
        return y_ND


def _training_forward() -> bool:
    """A training step's forward: not evaluation (no_grad) and not activation recomputation, which runs the forward
    again inside the backward (--recompute; the rows then travel twice, but the step routed them once)."""
    in_backward = getattr(torch._C, "_current_graph_task_id", lambda: -1)() != -1
    return torch.is_grad_enabled() and not in_backward


def _install_exchange(experts: Experts, group, ep: int) -> None:
    exchange = _Exchange(group, ep, experts.n_expert)
    experts.register_forward_pre_hook(exchange.dispatch)
    experts.register_forward_hook(exchange.combine)
    experts.expert_exchange = exchange


def take_exchange_counts(model: nn.Module) -> list[tuple[int, int]] | None:
    """(rows sent, rows received) by this rank in each MoE layer since the last call, then reset; None without
    expert parallelism. A row is one token's assignment to one expert (top-k of them per token)."""
    out = []
    for moe in model.moe_layers():
        exchange = getattr(moe.experts, "expert_exchange", None)
        if exchange is None:
            return None
        out.append((exchange.sent, exchange.received))
        exchange.sent = exchange.received = 0
    return out


__all__ = ["apply_expert_parallel", "expert_parameters", "take_exchange_counts"]
