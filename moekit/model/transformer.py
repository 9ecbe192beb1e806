"""The decoder-only transformer: pre-norm blocks of attention and a dense or MoE MLP, RoPE, no dropout.

    model = Transformer(get_preset("tiny"))
    out = model(idx_BT, targets_BT)      # out.loss = cross-entropy + router losses; out.logits_BTV
    with torch.device("meta"):           # the 1.8T gpt4 preset, built without memory
        big = Transformer(get_preset("gpt4"))

Parameter counts of a built model equal `moekit.counts.count_params(cfg)` (tests/test_counts.py).
Shape legend: B batch, T tokens, D d_model, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import ModelConfig
from moekit.model.attention import Attention, KVCache, rope_cos_sin, rope_inv_freq
from moekit.model.moe import MLP, MoE, RoutingInfo


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg, cfg.dense_d_ff)

    def forward(self, x_BTD, cos, sin, cache: KVCache | None = None, start_pos: int = 0):
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos, sin, cache, start_pos)
        y_BTD, info = self.mlp(self.mlp_norm(x_BTD))
        return x_BTD + y_BTD, info


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None = None  # ce_loss + aux_loss_coef * aux_loss + z_loss_coef * z_loss
    ce_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # mean over MoE layers (1.0 = perfectly balanced)
    z_loss: torch.Tensor | None = None  # mean over MoE layers
    routing: list[RoutingInfo] = field(default_factory=list)  # one per MoE layer


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2 init: N(0, std); residual output projections scaled by 1/sqrt(2 n_layer); norms at 1.

        On the meta device this is a no-op (there is no memory to fill).
        """
        if self.tok_emb.weight.is_meta:
            return
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std, out_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name:
                p.fill_(1.0 if leaf == "weight" else 0.0)
            elif leaf == "bias":
                p.zero_()
            else:
                is_out = name.endswith(("attn.wo.weight", "mlp.w2.weight", "mlp.w2"))
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * (out_std if is_out else std))
        self.inv_freq.copy_(rope_inv_freq(self.cfg))

    def new_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> list[KVCache]:
        """One contiguous KV cache per layer, for `forward(..., cache=...)` token-by-token decoding."""
        p = self.tok_emb.weight
        return [KVCache(batch, max_len or self.cfg.max_seq_len, self.cfg.n_kv_head, self.cfg.head_dim,
                        dtype or p.dtype, p.device) for _ in self.blocks]

    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None, *,
                cache: list[KVCache] | None = None, start_pos: int = 0,
                positions_BT: torch.Tensor | None = None) -> ModelOutput:
        B, T = idx_BT.shape
        if positions_BT is None:
            positions_BT = torch.arange(start_pos, start_pos + T, device=idx_BT.device).expand(B, T)
        x_BTD = self.tok_emb(idx_BT)
        cos, sin = rope_cos_sin(self.inv_freq, positions_BT)
        routing: list[RoutingInfo] = []
        for i, block in enumerate(self.blocks):
            x_BTD, info = block(x_BTD, cos, sin, cache[i] if cache is not None else None, start_pos)
            if info is not None:
                routing.append(info)
        logits_BTV = self.lm_head(self.norm(x_BTD))
        out = ModelOutput(logits=logits_BTV, routing=routing)
        if routing and routing[0].aux_loss is not None:  # (not under inference mode: moe.py)
            out.aux_loss = torch.stack([r.aux_loss for r in routing]).mean()
            out.z_loss = torch.stack([r.z_loss for r in routing]).mean()
        if targets_BT is not None:
            out.ce_loss = F.cross_entropy(logits_BTV.flatten(0, 1).float(), targets_BT.flatten(), ignore_index=-100)
            out.loss = out.ce_loss
            if out.aux_loss is not None:
                out.loss = out.loss + self.cfg.aux_loss_coef * out.aux_loss + self.cfg.z_loss_coef * out.z_loss
        return out

    def moe_layers(self) -> list[MoE]:
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoE)]
