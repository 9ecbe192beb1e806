"""Rotary position embeddings and causal self-attention with any number of KV heads (MHA, GQA, MQA).

GPT-4 uses multi-query attention (SPEC section 2): one K/V head shared by every query head, which
cuts the KV cache by n_head x (SPEC section 6: 2 x layers x n_kv_head x head_dim x bytes per token).

One forward pass serves training, `generate` and the serving engine: the attention context says
what the new tokens attend to besides themselves (nothing, a contiguous cache, or a paged cache).

Shape legend: B batch, T new tokens, S attended tokens (cache + new) or cache slots, D d_model,
H query heads, G KV heads, Dh head_dim, L layers, R requests in a group, Q queries per request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import ModelConfig
from moekit.model.linear import Linear


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/Dh) (Su et al. 2021), scaled as `cfg.rope_scaling` says.

    Computed in float32 the way Hugging Face does, so that loaded checkpoints match it to the bit.
    """
    dh = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dh, 2, dtype=torch.int64).float() / dh))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    factor = float(rs["factor"])
    if rs["rope_type"] == "linear":
        return inv_freq / factor  # position interpolation (Chen et al. 2023): 32k positions -> 8k range
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
    lo, hi = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
    old_len = float(rs["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wavelen > old_len / lo, inv_freq / factor,
                       torch.where(wavelen < old_len / hi, inv_freq, blended))


def rope_cos_sin(inv_freq: torch.Tensor, positions_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos, sin of shape (B, T, Dh) for integer positions (any order: prefill, decode, ragged)."""
    angles_BTh = positions_BT.to(torch.float32)[..., None] * inv_freq.to(positions_BT.device)
    angles_BTDh = torch.cat([angles_BTh, angles_BTh], dim=-1)  # "rotate half" layout, as Llama/HF
    return angles_BTDh.cos(), angles_BTDh.sin()


def apply_rope(x_BHTDh: torch.Tensor, cos_BTDh: torch.Tensor, sin_BTDh: torch.Tensor) -> torch.Tensor:
    cos_BTDh, sin_BTDh = cos_BTDh.to(x_BHTDh.dtype), sin_BTDh.to(x_BHTDh.dtype)
    half = x_BHTDh.shape[-1] // 2
    x1, x2 = x_BHTDh[..., :half], x_BHTDh[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x_BHTDh * cos_BTDh[:, None] + rotated * sin_BTDh[:, None]


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The LM's norm (before attention, MLP, cross-attention and the head): RMSNorm or LayerNorm."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class KVCache(nn.Module):
    """A contiguous per-layer K/V cache for `generate` (the serving engine has a paged one)."""

    def __init__(self, batch: int, max_len: int, n_kv_head: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        shape = (batch, n_kv_head, max_len, head_dim)
        self.register_buffer("k_BGSDh", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_BGSDh", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k_BGTDh: torch.Tensor, v_BGTDh: torch.Tensor):
        end = start + k_BGTDh.shape[2]
        if end > self.k_BGSDh.shape[2]:
            raise ValueError(f"KV cache holds {self.k_BGSDh.shape[2]} tokens; cannot write up to {end}")
        self.k_BGSDh[:, :, start:end] = k_BGTDh
        self.v_BGSDh[:, :, start:end] = v_BGTDh
        return self.k_BGSDh[:, :, :end], self.v_BGSDh[:, :, :end]


# ---- attention contexts: what a forward pass attends to besides its own tokens ------------------------
# Passed to `Transformer.forward(..., ctx=...)` as an argument (nano-vllm keeps the same facts in a
# module-global `Context`; an argument keeps the model a pure function of its inputs). None = plain
# causal attention over the tokens given (training, evaluation).
def causal_mask(last_visible_Q: torch.Tensor, S: int) -> torch.Tensor:
    """(..., Q, S) bool, True where query q may attend key s: s <= last_visible[q] (its own position).

    The one mask builder: a chunk after a contiguous cache, a prefill chunk or a padded batch of
    short queries over a paged cache, a captured CUDA-graph step.
    """
    return torch.arange(S, device=last_visible_Q.device) <= last_visible_Q[..., None]


@dataclass
class ContiguousContext:
    """Decoding with one contiguous `KVCache` per layer; the new tokens sit at start_pos, start_pos + 1..."""

    caches: list[KVCache]
    start_pos: int = 0


@dataclass
class AttentionGroup:
    """The queries of some requests of a ragged batch and the paged cache slots they attend to; one SDPA."""

    q_rows_RQ: torch.Tensor  # row of each query in the flat batch (padding repeats a real row)
    kv_slots_RS: torch.Tensor  # cache slot of each attended token (padding points at any valid slot)
    mask_R1QS: torch.Tensor | None  # True = may attend; None = plain causal (a fresh prefill)
    out_rows: torch.Tensor  # rows of the flat batch that receive this group's real queries
    out_valid_RQ: torch.Tensor | None  # which (r, q) are real queries (None: all, in row order)


@dataclass
class PagedContext:
    """A ragged batch (B = 1, its T tokens from many requests) over a paged KV cache (moekit/infer/).

    Per layer, every new token's K/V is written into its slot *before* any attention reads the
    cache (vLLM: `reshape_and_cache`, then attention), so a request may read blocks that another
    request of the same batch is filling (a prefix-cache hit registered in this very step).
    """

    k_LSGDh: list[torch.Tensor]  # per layer, K of every cache slot (S, G, Dh)
    v_LSGDh: list[torch.Tensor]
    slots_T: torch.Tensor  # the cache slot each new token's K/V is written to
    groups: list[AttentionGroup]


AttentionContext = ContiguousContext | PagedContext | None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wq = Linear(cfg.d_model, cfg.q_dim, bias=cfg.bias)
        self.wk = Linear(cfg.d_model, cfg.kv_dim, bias=cfg.bias)
        self.wv = Linear(cfg.d_model, cfg.kv_dim, bias=cfg.bias)
        self.wo = Linear(cfg.q_dim, cfg.d_model, bias=cfg.bias)

    def qkv(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Projected, rotated q (B, H, T, Dh), k and v (B, G, T, Dh)."""
        B, T, _ = x_BTD.shape
        q = self.wq(x_BTD).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.wk(x_BTD).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.wv(x_BTD).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ctx: AttentionContext = None, layer: int = 0) -> torch.Tensor:
        """Causal self-attention of the new tokens, over `ctx`'s cache (of layer `layer`) if any."""
        B, T, _ = x_BTD.shape
        q_BHTDh, k_BGTDh, v_BGTDh = self.qkv(x_BTD, cos, sin)
        gqa = self.n_kv_head != self.n_head
        if isinstance(ctx, PagedContext):
            o_BTHDh = self._paged(q_BHTDh, k_BGTDh, v_BGTDh, ctx, layer)
        elif isinstance(ctx, ContiguousContext):
            k_BGSDh, v_BGSDh = ctx.caches[layer].update(ctx.start_pos, k_BGTDh, v_BGTDh)
            mask_TS = None
            if T > 1:  # a chunk after cached tokens: token t sees the cache and new tokens up to t
                mask_TS = causal_mask(ctx.start_pos + torch.arange(T, device=x_BTD.device), k_BGSDh.shape[2])
            o_BTHDh = F.scaled_dot_product_attention(q_BHTDh, k_BGSDh, v_BGSDh, attn_mask=mask_TS,
                                                     enable_gqa=gqa).transpose(1, 2)
        else:
            # Plain causal attention; SDPA picks the flash / memory-efficient kernel where it can.
            o_BTHDh = F.scaled_dot_product_attention(q_BHTDh, k_BGTDh, v_BGTDh, is_causal=True,
                                                     enable_gqa=gqa).transpose(1, 2)
        return self.wo(o_BTHDh.reshape(B, T, self.n_head * self.head_dim))

    def _paged(self, q_1HTDh, k_1GTDh, v_1GTDh, ctx: PagedContext, layer: int) -> torch.Tensor:
        """Write the new K/V into their slots, then attend group by group (gathering each request's
        slots; on a GPU the gather is where a paged-attention kernel, FlashAttention's `block_table`
        or vLLM's `paged_attention`, goes)."""
        k_SGDh, v_SGDh = ctx.k_LSGDh[layer], ctx.v_LSGDh[layer]
        k_SGDh.index_copy_(0, ctx.slots_T, k_1GTDh[0].transpose(0, 1).to(k_SGDh.dtype))  # write first...
        v_SGDh.index_copy_(0, ctx.slots_T, v_1GTDh[0].transpose(0, 1).to(v_SGDh.dtype))
        q_THDh = q_1HTDh[0].transpose(0, 1)
        o_THDh = torch.empty_like(q_THDh)
        for g in ctx.groups:  # ...then read
            q_RHQDh = q_THDh[g.q_rows_RQ].permute(0, 2, 1, 3)
            k_RGSDh = k_SGDh[g.kv_slots_RS].permute(0, 2, 1, 3).to(q_RHQDh.dtype)
            v_RGSDh = v_SGDh[g.kv_slots_RS].permute(0, 2, 1, 3).to(q_RHQDh.dtype)
            o_RHQDh = F.scaled_dot_product_attention(q_RHQDh, k_RGSDh, v_RGSDh, attn_mask=g.mask_R1QS,
                                                     is_causal=g.mask_R1QS is None,
                                                     enable_gqa=self.n_kv_head != self.n_head)
            o_RQHDh = o_RHQDh.permute(0, 2, 1, 3)
            o_THDh[g.out_rows] = (o_RQHDh[g.out_valid_RQ] if g.out_valid_RQ is not None
                                  else o_RQHDh.reshape(-1, *o_RQHDh.shape[2:]))
        return o_THDh[None]
