"""Slow, obviously correct oracles. Used only by tests, to check the fast paths (DESIGN.md principle 4).

- `moe_loop`: a plain loop over experts and top-k ranks with boolean masks, no sorting, no gathers.
- `capacity_keep_loop`: GShard's capacity rule, one assignment at a time in Python.
- `attention_naive`: softmax(q k^T / sqrt(d) + causal mask) v with K/V heads repeated by hand.
- `gated_cross_attention_loop`: a gated cross-attention layer, one token and one head at a time.
"""

from __future__ import annotations

import math

import torch

from moekit.model.moe import MoE, activation, route


def capacity_keep_loop(experts_TK: torch.Tensor, n_expert: int, capacity: int) -> torch.Tensor:
    """Every token's 1st choice is served before any 2nd choice; within a rank, earlier tokens first."""
    T, K = experts_TK.shape
    keep = torch.zeros(T, K, dtype=torch.bool)
    used = [0] * n_expert
    for k in range(K):
        for t in range(T):
            e = int(experts_TK[t, k])
            if used[e] < capacity:
                used[e] += 1
                keep[t, k] = True
    return keep


def moe_loop(moe: MoE, x_BTD: torch.Tensor) -> torch.Tensor:
    """The MoE layer's output computed expert by expert: y_t = sum_k w_tk * expert_{e_tk}(x_t)."""
    x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
    T, E, K = x_TD.shape[0], moe.n_expert, moe.top_k
    _, weights_TK, experts_TK = route(moe.router(x_TD), K)
    keep_TK = torch.ones_like(experts_TK, dtype=torch.bool)
    if moe.capacity_factor > 0:
        keep_TK = capacity_keep_loop(experts_TK.cpu(), E, math.ceil(moe.capacity_factor * T * K / E))
        keep_TK = keep_TK.to(x_TD.device)
    y_TD = torch.zeros_like(x_TD)
    for e in range(E):
        for k in range(K):
            mask_T = (experts_TK[:, k] == e) & keep_TK[:, k]
            if not mask_T.any():
                continue
            x_mD = x_TD[mask_T]
            ex = moe.experts  # expert e's weights are (out, in), as an nn.Linear's
            h3 = x_mD @ ex.w3[e].t() if ex.w3 is not None else None
            out_mD = activation(x_mD @ ex.w1[e].t(), h3) @ ex.w2[e].t()
            y_TD[mask_T] = y_TD[mask_T] + weights_TK[mask_T, k, None].to(x_TD.dtype) * out_mD
    return y_TD.view_as(x_BTD)


def attention_naive(q_BHTDh: torch.Tensor, k_BGSDh: torch.Tensor, v_BGSDh: torch.Tensor,
                    start_pos: int = 0) -> torch.Tensor:
    """Causal attention of T new queries (at positions start_pos...) over S = start_pos + T keys."""
    H, G = q_BHTDh.shape[1], k_BGSDh.shape[1]
    k = k_BGSDh.repeat_interleave(H // G, dim=1)
    v = v_BGSDh.repeat_interleave(H // G, dim=1)
    T, S = q_BHTDh.shape[2], k.shape[2]
    scores = q_BHTDh @ k.transpose(-1, -2) / math.sqrt(q_BHTDh.shape[-1])
    allowed = torch.ones(T, S, dtype=torch.bool).tril(start_pos)  # query t sees keys 0..start_pos + t
    scores = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
    return scores.softmax(-1) @ v


def gated_cross_attention_loop(layer, x_BTD: torch.Tensor, image_BT: torch.Tensor,
                               visual_ILD: torch.Tensor) -> torch.Tensor:
    """moekit.model.vision.GatedCrossAttention, token by token and head by head: a token with image i >= 0 gets
    x + tanh(attn_gate) a, then + tanh(mlp_gate) MLP(norm(.)), with a = wo(concat over heads of softmax(q k^T /
    sqrt(Dh)) v) over image i's visual tokens; a token with image -1 is unchanged."""
    att = layer.attn
    H, G, Dh = att.n_head, att.n_kv_head, att.head_dim
    out = x_BTD.clone()
    k_ILGDh = att.wk(visual_ILD).unflatten(-1, (G, Dh))
    v_ILGDh = att.wv(visual_ILD).unflatten(-1, (G, Dh))
    for b in range(x_BTD.shape[0]):
        for t in range(x_BTD.shape[1]):
            i = int(image_BT[b, t])
            if i < 0:
                continue
            x = x_BTD[b, t]
            q_HDh = att.wq(layer.attn_norm(x)).view(H, Dh)
            heads = []
            for h in range(H):
                g = h // (H // G)  # query head h reads KV head g (GQA/MQA grouping, as repeat_interleave)
                k_LDh, v_LDh = k_ILGDh[i, :, g], v_ILGDh[i, :, g]
                w_L = torch.softmax(k_LDh @ q_HDh[h] / math.sqrt(Dh), dim=0)
                heads.append(w_L @ v_LDh)
            y = x + torch.tanh(layer.attn_gate[0]) * att.wo(torch.cat(heads))
            out[b, t] = y + torch.tanh(layer.mlp_gate[0]) * layer.mlp(layer.mlp_norm(y))[0]
    return out
