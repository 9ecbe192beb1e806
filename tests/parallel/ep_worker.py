"""The worker of tests/parallel/test_expert_parallel.py (2 ranks) and test_expert_parallel_4.py (4 ranks): spawned
once per file, it checks one MoE layer under expert parallelism against the same layer in one process.

Every rank builds the same seeded layer and the same global batch of T tokens, computes the one-process reference
on all of it (no communication), then runs its own data-parallel slice (T / world consecutive tokens) through the
expert-parallel copy and backpropagates the same loss: sum(y * g) for a fixed random g, plus the load-balancing
and z-losses (each rank's share: 1 / world of its own, since the global statistics make their mean the one-process
loss). The router's gradient is summed over all ranks and the experts' over their expert-data-parallel group, as
moekit/parallel/data.py does (without the division by dp, which the sum-loss here does not need). Routings are
skewed on purpose: one feature is constant and the router's row for a "dead" expert points against it, so that
expert (or every expert of one rank) gets no token at all: empty exchanges and idle experts must still work.
Results go to rank{r}.json; the test files assert on them.
"""

from __future__ import annotations

import torch
from torch import nn

T, D, F_HIDDEN = 64, 16, 24


class Holder(nn.Module):
    """One MoE layer standing in for a Transformer (apply_expert_parallel and sum_router_counts ask for moe_layers)."""

    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def moe_layers(self):
        return [self.moe]


def cases(world: int) -> dict[str, dict]:
    """name -> (n_expert, ep, dead experts, capacity_factor)."""
    out = {}
    for E in (4, 8):
        for ep in sorted({2, world}):
            if E % ep:
                continue
            El = E // ep
            out[f"E{E}_ep{ep}_one_dead"] = dict(E=E, ep=ep, dead=[E - 1], capacity=0.0)
            if E - El >= 2:  # top-2 needs two live experts: the last rank's experts all dead
                out[f"E{E}_ep{ep}_rank_dead"] = dict(E=E, ep=ep, dead=list(range(E - El, E)), capacity=0.0)
            out[f"E{E}_ep{ep}_capacity"] = dict(E=E, ep=ep, dead=[E - 1], capacity=1.0)
    return out


def build(E: int, dead: list[int], capacity: float):
    from moekit.config import ModelConfig
    from moekit.model.moe import MoE

    cfg = ModelConfig(vocab_size=32, n_layer=1, d_model=D, n_head=2, d_ff=F_HIDDEN, n_expert=E, top_k=2,
                      mlp="swiglu", capacity_factor=capacity, max_seq_len=T)
    g = torch.Generator().manual_seed(11)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        moe.router.weight[:, 0] = 1.0
        moe.router.weight[dead, 0] = -5.0  # against the constant feature: never in anyone's top 2
    moe.dispatch = "sorted"
    return moe


def data(E: int):
    g = torch.Generator().manual_seed(5)
    x_TD = torch.randn(T, D, generator=g) * 0.5
    x_TD[:, 0] = 3.0  # the constant feature the router's rows read (see build)
    return x_TD, torch.randn(T, D, generator=g)


def forward_backward(moe, x_TD, g_TD, share: float):
    x_TD = x_TD.clone().requires_grad_(True)
    y_TD, info = moe(x_TD[None])
    loss = (y_TD[0] * g_TD).sum() + share * (info.aux_loss + info.z_loss)
    loss.backward()
    return y_TD[0].detach(), x_TD.grad, info


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check_case(case: dict, rank: int, world: int) -> dict:
    import torch.distributed as dist

    from moekit.parallel.expert import apply_expert_parallel, take_exchange_counts
    from moekit.parallel.mesh import ParallelDims, build_expert_mesh
    from moekit.parallel.parallelize import sum_router_counts

    E, ep = case["E"], case["ep"]
    x_TD, g_TD = data(E)
    ref = build(E, case["dead"], case["capacity"])
    y_ref, gx_ref, info_ref = forward_backward(ref, x_TD, g_TD, 1.0)

    dims = ParallelDims(dp_replicate=world, ep=ep)
    expert_mesh = build_expert_mesh(dims, "cpu")
    holder = Holder(build(E, case["dead"], case["capacity"]))
    sum_router_counts(holder, dist.group.WORLD)  # global load-balancing statistics and capacity, as a trainer's
    apply_expert_parallel(holder, expert_mesh)
    moe = holder.moe
    lo, hi = rank * T // world, (rank + 1) * T // world
    y, gx, info = forward_backward(moe, x_TD[lo:hi], g_TD[lo:hi], 1.0 / world)

    router_g = moe.router.weight.grad.clone()
    dist.all_reduce(router_g)  # over every data rank
    edp = expert_mesh["edp"].get_group()
    El, j = E // ep, expert_mesh["ep"].get_local_rank()
    experts = {}
    for name in ("w1", "w2", "w3"):
        p = getattr(moe.experts, name)
        grad = p.grad.to_local().clone()
        dist.all_reduce(grad, group=edp)  # over the ranks holding the same experts
        experts[name] = {"weight": rel(p.to_local(), getattr(ref.experts, name)[j * El:(j + 1) * El].detach()),
                         "grad": rel(grad, getattr(ref.experts, name).grad[j * El:(j + 1) * El])}
    local_counts = moe.experts.expert_exchange.last_counts.clone()
    dist.all_reduce(local_counts, group=edp)  # rows for these experts, over the groups holding them
    aux_mean = info.aux_loss.detach().clone()
    dist.all_reduce(aux_mean)  # the ranks' losses average to the one-process loss (moe.py load_balancing_loss)
    kept_all = info.tokens_per_expert_E.clone()
    dist.all_reduce(kept_all)
    dropped_all = info.dropped.clone()
    dist.all_reduce(dropped_all)
    experts_ref = info_ref.experts_TK.reshape(-1)
    (sent, received), = take_exchange_counts(holder)
    return {
        "y": rel(y, y_ref[lo:hi]), "x_grad": rel(gx, gx_ref[lo:hi]),
        "router_grad": rel(router_g, ref.router.weight.grad), "experts": experts,
        "aux": abs(float(aux_mean / world - info_ref.aux_loss)) / float(info_ref.aux_loss),
        "local_counts": local_counts.tolist(),
        "ref_local_counts": info_ref.tokens_per_expert_E[j * El:(j + 1) * El].tolist(),
        "bincount_local": torch.bincount(experts_ref, minlength=E)[j * El:(j + 1) * El].tolist(),
        "kept_all": kept_all.tolist(), "kept_ref": info_ref.tokens_per_expert_E.tolist(),
        "dropped_all": int(dropped_all), "dropped_ref": int(info_ref.dropped),
        "sent": sent, "received": received, "dead": case["dead"],
        "placements": [str(pl) for pl in moe.experts.w1.placements],
        "local_shape": list(moe.experts.w1.to_local().shape),
    }


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from spawn import rank_main

    def body(result: dict) -> None:
        for name, case in cases(world).items():
            result["cases"][name] = check_case(case, rank, world)

    rank_main(rank, world, init_file, out_dir, body)
