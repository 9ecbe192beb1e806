"""Rotary position embeddings and causal self-attention with any number of KV heads (MHA, GQA, MQA).

GPT-4 uses multi-query attention (SPEC section 2): one K/V head shared by every query head, which
cuts the KV cache by n_head x (SPEC section 6: 2 x layers x n_kv_head x head_dim x bytes per token).

Shape legend: B batch, T new tokens, S attended tokens (cache + new), D d_model,
H query heads, G KV heads, Dh head_dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import ModelConfig


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


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.q_dim, bias=cfg.bias)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_dim, bias=cfg.bias)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_dim, bias=cfg.bias)
        self.wo = nn.Linear(cfg.q_dim, cfg.d_model, bias=cfg.bias)

    def qkv(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Projected, rotated q (B, H, T, Dh), k and v (B, G, T, Dh)."""
        B, T, _ = x_BTD.shape
        q = self.wq(x_BTD).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.wk(x_BTD).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.wv(x_BTD).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, start_pos: int = 0) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q_BHTDh, k_BGTDh, v_BGTDh = self.qkv(x_BTD, cos, sin)
        if cache is None:
            # Plain causal attention; SDPA picks the flash / memory-efficient kernel where it can.
            o = F.scaled_dot_product_attention(q_BHTDh, k_BGTDh, v_BGTDh, is_causal=True,
                                               enable_gqa=self.n_kv_head != self.n_head)
        else:
            k_BGSDh, v_BGSDh = cache.update(start_pos, k_BGTDh, v_BGTDh)
            mask_TS = None
            if T > 1:  # a chunk after cached tokens: token t sees cache + new tokens up to t
                S = k_BGSDh.shape[2]
                mask_TS = torch.arange(S, device=x_BTD.device) <= (
                    start_pos + torch.arange(T, device=x_BTD.device))[:, None]
            o = F.scaled_dot_product_attention(q_BHTDh, k_BGSDh, v_BGSDh, attn_mask=mask_TS,
                                               enable_gqa=self.n_kv_head != self.n_head)
        return self.wo(o.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))
