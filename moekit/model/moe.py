"""Feed-forward layers: the dense MLP and the sparse Mixture-of-Experts MLP with a top-k router.

GPT-4 (SPEC section 2): 16 experts in every layer's MLP, top-2 routing with a "quite simple" router.
moekit's router is the Switch/GShard/Mixtral one: softmax over expert logits, keep the top k,
renormalize the k weights to sum to 1. Two auxiliary losses keep it healthy: the Switch
load-balancing loss and the ST-MoE router z-loss. Dropless by default; with `capacity_factor > 0`
each expert takes at most ceil(capacity_factor x T x K / E) assignments (GShard) and drops the rest.

Three modules: `Router` (the gate), `Experts` (owns the stacked expert weights and both kernels) and
`MoE` = route -> permute -> experts -> combine. Quantization and expert parallelism replace or wrap
the `Experts` module from outside (moekit/infer/quant.py, moekit/parallel/), never the MoE.

Two dispatch paths compute the same function (tests/test_moe.py checks both against the loop in
`reference.py`, outputs and gradients):
- "sorted": sort the T x K assignments by expert, run each expert once on its contiguous slice.
  Each used expert's weights are read once: the path for training and prefill.
- "gather": gather the selected experts' weights per assignment and run one batched matmul. Only
  the k routed experts are read, with no host sync: the path for decoding a few tokens.

Shape legend: T tokens (batch x sequence, flattened), D d_model, E experts, K top-k,
F expert hidden size, N routed assignments (T x K, fewer after capacity dropping).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import ModelConfig
from moekit.model.grouped import (
    DispatchRows,
    PermuteRows,
    activation,
    grouped_expert_mlp,
    grouped_mm_expert_mlp,
    grouped_mm_ok,
)
from moekit.model.linear import Linear


class MLP(nn.Module):
    """Dense MLP; parameter names follow Llama: w1 = gate_proj, w3 = up_proj, w2 = down_proj."""

    def __init__(self, cfg: ModelConfig, d_ff: int):
        super().__init__()
        self.w1 = Linear(cfg.d_model, d_ff, bias=cfg.bias)
        self.w3 = Linear(cfg.d_model, d_ff, bias=cfg.bias) if cfg.mlp == "swiglu" else None
        self.w2 = Linear(d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, None]:
        h3 = self.w3(x_BTD) if self.w3 is not None else None
        return self.w2(activation(self.w1(x_BTD), h3)), None


@dataclass
class RoutingInfo:
    """What one MoE layer reports for one forward pass (losses carry gradients, counts do not)."""

    aux_loss: torch.Tensor | None  # Switch load-balancing loss, 1.0 at perfect balance (None: inference mode)
    z_loss: torch.Tensor | None  # mean squared log-sum-exp of the router logits (None: inference mode)
    tokens_per_expert_E: torch.Tensor  # assignments each expert computed (after dropping)
    dropped: torch.Tensor  # assignments dropped by the capacity limit (0 when dropless)
    entropy: torch.Tensor | None  # mean router entropy in nats (log E = uniform; None: inference mode)
    experts_TK: torch.Tensor | None = None  # each token's routed experts (before dropping)


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.top_k
        self.weight = nn.Parameter(torch.empty(cfg.n_expert, cfg.d_model))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        # Router logits in at least fp32, even under bf16 autocast: the softmax and top-k are precision-
        # sensitive and the matmul is tiny (Switch Transformer, "selective precision"). At least, not
        # exactly: a float64 model gates in float64 (an fp32 gate made it only fp32-exact, and the fp32
        # GEMM's rounding depends on the row count, so decode and full forward disagreed at 1e-8).
        dtype = torch.promote_types(x_TD.dtype, torch.float32)
        with torch.autocast(x_TD.device.type, enabled=False):
            return F.linear(x_TD.to(dtype), self.weight.to(dtype))


def route(logits_TE: torch.Tensor, top_k: int):
    """Softmax, top-k, renormalize: returns probs_TE, weights_TK (sum to 1), experts_TK."""
    probs_TE = logits_TE.softmax(dim=-1)
    weights_TK, experts_TK = probs_TE.topk(top_k, dim=-1)
    return probs_TE, weights_TK / weights_TK.sum(dim=-1, keepdim=True), experts_TK


def capacity_keep(experts_TK: torch.Tensor, n_expert: int, capacity: int,
                  offset_KE: torch.Tensor | None = None) -> torch.Tensor:
    """Which assignments fit under `capacity` per expert, as a (T, K) bool mask.

    Priority as in GShard (Lepikhin et al. 2020, algorithm 1): every token's 1st choice before any
    2nd choice, and within a choice rank, earlier tokens first. `offset_KE` (see `global_offsets`) moves
    these tokens' places in each queue by what other data-parallel ranks' tokens put ahead of them.
    """
    T, K = experts_TK.shape
    experts_N = experts_TK.t().reshape(-1)  # rank-major priority order
    onehot_NE = F.one_hot(experts_N, n_expert)
    position_N = (onehot_NE.cumsum(0) * onehot_NE).sum(-1) - 1  # place in its expert's queue
    if offset_KE is not None:
        choice_N = torch.arange(K, device=experts_TK.device).repeat_interleave(T)
        position_N = position_N + offset_KE[choice_N, experts_N]
    return (position_N < capacity).view(K, -1).t()


def global_offsets(counts_KE: torch.Tensor, all_RKE: torch.Tensor, rank: int) -> torch.Tensor:
    """How far back in each expert's queue data-parallel rank `rank`'s assignments stand when the queues are
    those of the whole batch, ranks holding consecutive slices of it (rank 0 the first): `counts_KE` are this
    rank's assignments per choice rank and expert, `all_RKE` every rank's. In the whole batch, choice k of a
    token on rank r comes after every choice < k of every rank and choice k of ranks < r; `capacity_keep`'s own
    positions already count this rank's choices < k, hence offset = sum_{k'<k} (all - mine) + sum_{r'<r} mine_k.
    """
    def before(c_KE):  # exclusive running sum over the choice ranks
        return c_KE.cumsum(0) - c_KE

    return before(all_RKE.sum(0)) - before(counts_KE) + all_RKE[:rank].sum(0)


def count_per_expert(expert_N: torch.Tensor, n: int) -> torch.Tensor:
    """How many entries of `expert_N` name each of `n` experts. Unlike torch.bincount, this needs no
    host sync on CUDA (bincount must read the maximum to size its output)."""
    return torch.zeros(n, dtype=torch.long, device=expert_N.device).scatter_add_(
        0, expert_N.reshape(-1), torch.ones_like(expert_N.reshape(-1)))


def load_balancing_loss(probs_TE: torch.Tensor, experts_TK: torch.Tensor,
                        reduce_counts: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Switch Transformer (Fedus et al. 2021, eq. 4), normalized so that perfect balance gives 1:

        aux = E * sum_e f_e * P_e,   f_e = (assignments to e) / (T * K),   P_e = mean_t probs[t, e]

    With uniform routing f_e = P_e = 1/E, so aux = E * E * (1/E^2) = 1; any imbalance raises it.
    f_e counts router decisions before capacity dropping and is not differentiable; P_e carries the
    gradient.

    `reduce_counts` (set on the MoE from outside by data parallelism) sums the assignment counts over
    the data-parallel ranks: f_e is then the whole global batch's, as in one process. Each rank keeps
    its own P_e; since the loss is linear in P and DDP/FSDP average the gradients, the mean of the
    ranks' losses and its gradient equal one process's (global-batch balancing, Qiu et al. 2025,
    "Demons in the Detail"; Megatron's per-micro-batch statistic is the special case of one rank).
    """
    E = probs_TE.shape[-1]
    counts_E = count_per_expert(experts_TK, E).to(probs_TE.dtype)
    n = torch.tensor(float(experts_TK.numel()), dtype=probs_TE.dtype, device=probs_TE.device)
    if reduce_counts is not None:
        counts_E, n = reduce_counts(torch.cat([counts_E, n[None]])).split([E, 1])
    return E * (counts_E / n * probs_TE.mean(dim=0)).sum()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's (bf16 training), else the input's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class Experts(nn.Module):
    """E expert MLPs, stored (E, out, in) as nn.Linear, torchtitan and gpt-fast store them: w1_EFD (gate,
    or fc for GELU), w3_EFD (up, SwiGLU only), w2_EDF (down). Tensor parallelism splits F (w1/w3 on
    dimension 1, w2 on dimension 2) and expert parallelism splits E, the dimensions Megatron and
    torchtitan shard. Two kernels compute the same function:

    - `forward(x_ND, counts_E)`: rows sorted by expert, expert e taking the next counts_E[e] rows;
      rows past sum(counts_E) are dropped assignments and get zeros. Each used expert's weights are
      read once (torch's grouped GEMM on CUDA bf16, else one GEMM per expert).
    - `gather(x_ND, expert_N)`: row n through expert expert_N[n], in any order: the routed experts'
      weights are gathered per row and one batched matmul runs, with no host sync (decode).
    """

    def __init__(self, n_expert: int, d_model: int, d_ff: int, swiglu: bool):
        super().__init__()
        self.n_expert = n_expert
        self.w1 = nn.Parameter(torch.empty(n_expert, d_ff, d_model))
        self.w3 = nn.Parameter(torch.empty(n_expert, d_ff, d_model)) if swiglu else None
        self.w2 = nn.Parameter(torch.empty(n_expert, d_model, d_ff))
        # Serving's expert parallelism (moekit/parallel/tensor.py, split_experts) leaves this rank experts
        # [lo, hi) of the layer: rows routed elsewhere get zeros here, and the MoE's sum over the ranks adds them.
        self.expert_range: tuple[int, int] | None = None

    def local_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """w1, w2, w3 as plain tensors: this rank's shards when tensor parallelism made them DTensors
        (moekit/parallel/tensor.py splits F; the kernels below run on the local slice, as torchtitan's
        GroupedExperts does), the weights themselves otherwise."""
        def local(w):
            return w.to_local() if hasattr(w, "to_local") else w

        return local(self.w1), local(self.w2), local(self.w3)

    def _weights(self, dtype: torch.dtype):
        w1, w2, w3 = self.local_weights()
        return w1.to(dtype), w2.to(dtype), (w3.to(dtype) if w3 is not None else None)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        if self.expert_range is not None:  # this rank's experts are one contiguous run of the sorted rows
            lo, hi = self.expert_range
            first, n = int(counts_E[:lo].sum()), int(counts_E[lo:hi].sum())
            y_ND = x_ND.new_zeros(x_ND.shape[0], self.local_weights()[1].shape[1])
            if n:
                y_ND[first:first + n] = self._forward(x_ND[first:first + n], counts_E[lo:hi])
            return y_ND
        return self._forward(x_ND, counts_E)

    def _forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        w1, w2, w3 = self._weights(x_ND.dtype)
        if grouped_mm_ok(x_ND.device, x_ND.dtype):  # one fused kernel per matmul, no host sync (CUDA, bf16)
            return grouped_mm_expert_mlp(x_ND, counts_E.cumsum(0).to(torch.int32), w1, w2, w3)
        # One host sync for the slice sizes; experts without tokens are skipped (and not read).
        return grouped_expert_mlp(x_ND, counts_E.tolist(), w1, w2, w3)

    def gather(self, x_ND: torch.Tensor, expert_N: torch.Tensor) -> torch.Tensor:
        if self.expert_range is not None:  # rows of other ranks' experts: computed with a local one, then zeroed
            lo, hi = self.expert_range
            mine_N = (expert_N >= lo) & (expert_N < hi)
            y_ND = self._gather(x_ND, (expert_N - lo).clamp(0, hi - lo - 1))
            return y_ND * mine_N[:, None].to(y_ND.dtype)
        return self._gather(x_ND, expert_N)

    def _gather(self, x_ND: torch.Tensor, expert_N: torch.Tensor) -> torch.Tensor:
        w1, w2, w3 = self.local_weights()

        def pick(w_EOI):  # gather the routed experts first, then cast: read k experts, not E
            return w_EOI[expert_N].to(x_ND.dtype).transpose(1, 2)

        x_N1D = x_ND.unsqueeze(1)
        h3 = torch.bmm(x_N1D, pick(w3)) if w3 is not None else None
        return torch.bmm(activation(torch.bmm(x_N1D, pick(w1)), h3), pick(w2)).squeeze(1)

    def capturable(self, dispatch: str, dtype: torch.dtype) -> bool:
        """Can a CUDA graph capture this dispatch path at compute dtype `dtype` (no host sync)?"""
        return dispatch == "gather" or grouped_mm_ok(self.w1.device, dtype)


class MoE(nn.Module):
    """Route -> permute -> experts -> combine. `dispatch` is "auto", "sorted" or "gather" (module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_expert, self.top_k, self.capacity_factor = cfg.n_expert, cfg.top_k, cfg.capacity_factor
        # Experts before the router: parameters are then listed (and seeded by Transformer.init_weights) in the
        # order of moekit < 0.2, which held the expert weights on the MoE itself, so a seed gives the same model.
        self.experts = Experts(cfg.n_expert, cfg.d_model, cfg.d_ff, cfg.mlp == "swiglu")
        self.router = Router(cfg)
        self.dispatch = "auto"
        # Data parallelism sets this to a sum over its ranks (moekit/parallel/data.py): see load_balancing_loss.
        self.reduce_counts: Callable[[torch.Tensor], torch.Tensor] | None = None
        # ... and this to an all-gather of per-rank (K, E) counts, returning (all_RKE, this rank's index): the
        # capacity limit is then the whole batch's, and drops the tokens one process would (`global_offsets`).
        self.gather_counts: Callable[[torch.Tensor], tuple[torch.Tensor, int]] | None = None

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, RoutingInfo]:
        x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
        T, E, K = x_TD.shape[0], self.n_expert, self.top_k
        logits_TE = self.router(x_TD)
        probs_TE, weights_TK, experts_TK = route(logits_TE, K)

        # Assignments in rank-major order (all 1st choices, then all 2nd choices...): n = k * T + t.
        expert_N = experts_TK.t().reshape(-1)
        weight_N = weights_TK.t().reshape(-1).to(x_TD.dtype)
        keep_N = None
        dropped = torch.zeros((), dtype=torch.long, device=x_TD.device)
        if self.capacity_factor > 0:
            offset_KE, batch_T = None, T
            if self.gather_counts is not None:  # the limit of the whole (data-parallel) batch
                counts_KE = F.one_hot(experts_TK, E).sum(0)
                all_RKE, rank = self.gather_counts(counts_KE)
                offset_KE, batch_T = global_offsets(counts_KE, all_RKE, rank), int(all_RKE[:, 0].sum())
            capacity = math.ceil(self.capacity_factor * batch_T * K / E)
            keep_N = capacity_keep(experts_TK, E, capacity, offset_KE).t().reshape(-1)
            dropped = T * K - keep_N.sum()

        use_gather = self.dispatch == "gather" or (self.dispatch == "auto" and T * K <= E)
        run = self._gather if use_gather else self._sorted
        y_TD = run(x_TD, expert_N, weight_N, keep_N)
        kept_N = expert_N if keep_N is None else expert_N[keep_N]

        # The losses and the entropy serve training and its logs only. Under inference mode (the serving
        # engine) they are left out: ~15 small kernels per layer, a sixth of a graphed decode step's.
        serving = torch.is_inference_mode_enabled()
        info = RoutingInfo(
            aux_loss=None if serving else load_balancing_loss(probs_TE, experts_TK, self.reduce_counts),
            z_loss=None if serving else torch.logsumexp(logits_TE, dim=-1).square().mean(),
            tokens_per_expert_E=count_per_expert(kept_N, E),
            dropped=dropped.detach(),
            entropy=None if serving else -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(-1).mean().detach(),
            experts_TK=experts_TK.detach(),
        )
        return y_TD.view_as(x_BTD), info

    def _sorted(self, x_TD, expert_N, weight_N, keep_N):
        """Permute the assignments into expert order, run each expert on its slice, permute back."""
        E, T, N = self.n_expert, x_TD.shape[0], expert_N.numel()
        if keep_N is not None:  # dropped assignments go to a sentinel expert E: sorted last, not run
            expert_N = torch.where(keep_N, expert_N, E)
        order_N = torch.argsort(expert_N, stable=True)
        inverse_N = torch.empty_like(order_N)
        inverse_N[order_N] = torch.arange(N, device=order_N.device)
        x_ND = DispatchRows.apply(x_TD.to(compute_dtype(x_TD)), order_N, inverse_N)
        y_ND = self.experts(x_ND, count_per_expert(expert_N, E + 1)[:E]).to(x_TD.dtype)
        y_KTD = PermuteRows.apply(y_ND, inverse_N, order_N).view(-1, T, x_TD.shape[1])
        return (y_KTD * weight_N.view(-1, T, 1)).sum(0)

    def _gather(self, x_TD, expert_N, weight_N, keep_N):
        """Each assignment through its own expert, summed into its token (no sort, no host sync)."""
        token_N = torch.arange(x_TD.shape[0], device=x_TD.device).repeat(self.top_k)
        if keep_N is not None:
            token_N, expert_N, weight_N = token_N[keep_N], expert_N[keep_N], weight_N[keep_N]
        x_ND = x_TD.index_select(0, token_N).to(compute_dtype(x_TD))
        y_ND = self.experts.gather(x_ND, expert_N).to(x_TD.dtype) * weight_N[:, None]
        return torch.zeros_like(x_TD).index_add_(0, token_N, y_ND)
