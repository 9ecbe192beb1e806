"""Feed-forward layers: the dense MLP and the sparse Mixture-of-Experts MLP with a top-k router.

GPT-4 (SPEC section 2): 16 experts in every layer's MLP, top-2 routing with a "quite simple" router.
moekit's router is the Switch/GShard/Mixtral one: softmax over expert logits, keep the top k,
renormalize the k weights to sum to 1. Two auxiliary losses keep it healthy: the Switch
load-balancing loss and the ST-MoE router z-loss. Dropless by default; with `capacity_factor > 0`
each expert takes at most ceil(capacity_factor x T x K / E) assignments (GShard) and drops the rest.

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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import ModelConfig


def activation(h1: torch.Tensor, h3: torch.Tensor | None) -> torch.Tensor:
    """GELU for the GPT-style 2-matrix MLP; SwiGLU silu(x W1) * (x W3) for Llama/Mixtral (Shazeer 2020)."""
    return F.gelu(h1) if h3 is None else F.silu(h1) * h3


class MLP(nn.Module):
    """Dense MLP; parameter names follow Llama: w1 = gate_proj, w3 = up_proj, w2 = down_proj."""

    def __init__(self, cfg: ModelConfig, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, d_ff, bias=cfg.bias)
        self.w3 = nn.Linear(cfg.d_model, d_ff, bias=cfg.bias) if cfg.mlp == "swiglu" else None
        self.w2 = nn.Linear(d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, None]:
        h3 = self.w3(x_BTD) if self.w3 is not None else None
        return self.w2(activation(self.w1(x_BTD), h3)), None


@dataclass
class RoutingInfo:
    """What one MoE layer reports for one forward pass (losses carry gradients, counts do not)."""

    aux_loss: torch.Tensor  # Switch load-balancing loss, 1.0 at perfect balance
    z_loss: torch.Tensor  # mean squared log-sum-exp of the router logits
    tokens_per_expert_E: torch.Tensor  # assignments each expert computed (after dropping)
    dropped: torch.Tensor  # assignments dropped by the capacity limit (0 when dropless)
    entropy: torch.Tensor  # mean router entropy in nats (log E = uniform)


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.top_k
        self.weight = nn.Parameter(torch.empty(cfg.n_expert, cfg.d_model))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        # Router logits in fp32 even under bf16 autocast: the softmax and top-k are precision-
        # sensitive and the matmul is tiny (Switch Transformer, "selective precision").
        with torch.autocast(x_TD.device.type, enabled=False):
            return F.linear(x_TD.float(), self.weight.float())


def route(logits_TE: torch.Tensor, top_k: int):
    """Softmax, top-k, renormalize: returns probs_TE, weights_TK (sum to 1), experts_TK."""
    probs_TE = logits_TE.softmax(dim=-1)
    weights_TK, experts_TK = probs_TE.topk(top_k, dim=-1)
    return probs_TE, weights_TK / weights_TK.sum(dim=-1, keepdim=True), experts_TK


def capacity_keep(experts_TK: torch.Tensor, n_expert: int, capacity: int) -> torch.Tensor:
    """Which assignments fit under `capacity` per expert, as a (T, K) bool mask.

    Priority as in GShard (Lepikhin et al. 2020, algorithm 1): every token's 1st choice before any
    2nd choice, and within a choice rank, earlier tokens first.
    """
    experts_N = experts_TK.t().reshape(-1)  # rank-major priority order
    onehot_NE = F.one_hot(experts_N, n_expert)
    position_N = (onehot_NE.cumsum(0) * onehot_NE).sum(-1) - 1  # place in its expert's queue
    return (position_N < capacity).view(experts_TK.shape[1], -1).t()


def load_balancing_loss(probs_TE: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
    """Switch Transformer (Fedus et al. 2021, eq. 4), normalized so that perfect balance gives 1:

        aux = E * sum_e f_e * P_e,   f_e = (assignments to e) / (T * K),   P_e = mean_t probs[t, e]

    With uniform routing f_e = P_e = 1/E, so aux = E * E * (1/E^2) = 1; any imbalance raises it.
    f_e counts router decisions before capacity dropping and is not differentiable; P_e carries the
    gradient.
    """
    E = probs_TE.shape[-1]
    f_E = torch.bincount(experts_TK.reshape(-1), minlength=E).to(probs_TE.dtype) / experts_TK.numel()
    return E * (f_E * probs_TE.mean(dim=0)).sum()


class MoE(nn.Module):
    """Top-k routed experts. `dispatch` is "auto", "sorted" or "gather" (see the module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, Fh = cfg.n_expert, cfg.d_model, cfg.d_ff
        self.n_expert, self.top_k, self.capacity_factor = E, cfg.top_k, cfg.capacity_factor
        self.router = Router(cfg)
        self.w1 = nn.Parameter(torch.empty(E, D, Fh))  # w1_EDF: gate (swiglu) or fc (gelu)
        self.w3 = nn.Parameter(torch.empty(E, D, Fh)) if cfg.mlp == "swiglu" else None  # w3_EDF: up
        self.w2 = nn.Parameter(torch.empty(E, Fh, D))  # w2_EFD: down
        self.dispatch = "auto"

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, RoutingInfo]:
        x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
        T, E, K = x_TD.shape[0], self.n_expert, self.top_k
        logits_TE = self.router(x_TD)
        probs_TE, weights_TK, experts_TK = route(logits_TE, K)

        # The assignment list, rank-major: token_N[i] goes to expert_N[i] with weight weight_N[i].
        token_N = torch.arange(T, device=x_TD.device).repeat(K)
        expert_N = experts_TK.t().reshape(-1)
        weight_N = weights_TK.t().reshape(-1)
        dropped = torch.zeros((), dtype=torch.long, device=x_TD.device)
        if self.capacity_factor > 0:
            capacity = math.ceil(self.capacity_factor * T * K / E)
            keep_N = capacity_keep(experts_TK, E, capacity).t().reshape(-1)
            token_N, expert_N, weight_N = token_N[keep_N], expert_N[keep_N], weight_N[keep_N]
            dropped = T * K - keep_N.sum()

        use_gather = self.dispatch == "gather" or (self.dispatch == "auto" and expert_N.numel() <= E)
        run = self._gather if use_gather else self._sorted
        y_TD = run(x_TD, token_N, expert_N, weight_N.to(x_TD.dtype))

        info = RoutingInfo(
            aux_loss=load_balancing_loss(probs_TE, experts_TK),
            z_loss=torch.logsumexp(logits_TE, dim=-1).square().mean(),
            tokens_per_expert_E=torch.bincount(expert_N, minlength=E).detach(),
            dropped=dropped.detach(),
            entropy=-(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(-1).mean().detach(),
        )
        return y_TD.view_as(x_BTD), info

    def _sorted(self, x_TD, token_N, expert_N, weight_N):
        order_N = torch.argsort(expert_N, stable=True)
        token_sorted_N = token_N[order_N]
        # One host sync for the slice sizes; experts without tokens are skipped (and not read).
        counts = torch.bincount(expert_N, minlength=self.n_expert).tolist()
        x_ND = x_TD[token_sorted_N]
        w1s, w2s = self.w1.unbind(0), self.w2.unbind(0)  # unbind: one stacked grad, not E scatters
        w3s = self.w3.unbind(0) if self.w3 is not None else None
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            x_nD = x_ND[start:start + n]
            h3 = x_nD @ w3s[e] if w3s is not None else None
            outs.append(activation(x_nD @ w1s[e], h3) @ w2s[e])
            start += n
        if not outs:  # every assignment was dropped
            return torch.zeros_like(x_TD)
        y_ND = torch.cat(outs) * weight_N[order_N, None]
        return torch.zeros_like(x_TD).index_add_(0, token_sorted_N, y_ND)

    def _gather(self, x_TD, token_N, expert_N, weight_N):
        x_N1D = x_TD[token_N].unsqueeze(1)
        h3 = torch.bmm(x_N1D, self.w3[expert_N]) if self.w3 is not None else None
        y_N1D = torch.bmm(activation(torch.bmm(x_N1D, self.w1[expert_N]), h3), self.w2[expert_N])
        return torch.zeros_like(x_TD).index_add_(0, token_N, y_N1D.squeeze(1) * weight_N[:, None])
