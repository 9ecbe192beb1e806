"""The decoder-only transformer: pre-norm blocks of attention and a dense or MoE MLP, RoPE, no dropout.

    model = Transformer(get_preset("tiny"))
    out = model(idx_BT, targets_BT)      # out.loss = cross-entropy + router losses; out.logits_BTV
    cache = model.new_cache(1, 256)      # decode token by token over a contiguous KV cache
    out = model(idx_1T, ctx=ContiguousContext(cache, start_pos=0))
    with torch.device("meta"):           # the 1.8T gpt4 preset, built without memory
        big = Transformer(get_preset("gpt4"))
    model = Transformer.from_tensors(cfg, safetensors_dict)   # the one loading path (runs, HF, checkpoints)

One forward pass serves training, `generate` and the serving engine (moekit/infer/runner.py builds a
`PagedContext` and calls `forward`). Blocks live in a ModuleDict keyed by layer index, so a pipeline
stage can drop the layers it does not own without renaming a weight (torchtitan does the same).
Parameter counts of a built model equal `moekit.counts.count_params(cfg)` (tests/test_counts.py).
Shape legend: B batch, T tokens, D d_model, V vocabulary, R rows of logits asked for.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import ModelConfig
from moekit.model.attention import (
    Attention,
    AttentionContext,
    ContiguousContext,
    KVCache,
    make_norm,
    rope_cos_sin,
    rope_inv_freq,
)
from moekit.model.linear import Linear
from moekit.model.moe import MLP, MoE, RoutingInfo
from moekit.model.vision import GatedCrossAttention, VisionInput, VisionModel


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer  # which layer of a KV cache this block reads and writes
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg, cfg.dense_d_ff)

    def forward(self, x_BTD, cos, sin, ctx: AttentionContext = None):
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos, sin, ctx, self.layer)
        y_BTD, info = self.mlp(self.mlp_norm(x_BTD))
        return x_BTD + y_BTD, info


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V); (R, V) when forward was given logits_rows
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
        self.blocks = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layer)})
        self.norm = make_norm(cfg)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # The vision side (SPEC section 5), registered after the text model so that a seed draws the same text
        # weights with or without it. xattn is keyed by the LM block each layer precedes.
        self.vision = VisionModel(cfg) if cfg.has_vision else None
        self.xattn = (nn.ModuleDict({str(i): GatedCrossAttention(cfg, i) for i in cfg.cross_attn_layers})
                      if cfg.has_vision else None)
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
            elif leaf.endswith("_gate"):  # Flamingo's tanh gates start closed: the text model is unchanged
                p.zero_()
            elif leaf == "bias":
                p.zero_()
            else:
                is_out = name.endswith(("attn.wo.weight", "mlp.w2.weight", "mlp.experts.w2"))
                # Stacked experts (E, out, in) are drawn (E, in, out) and transposed: the layout moekit stored
                # before the Experts module, so a seed still gives the very same model as it did then.
                shape = (p.shape[0], p.shape[2], p.shape[1]) if ".experts." in name else p.shape
                # The resampler's latents are queries, N(0, 1) as Flamingo's (lucidrains' flamingo-pytorch): at
                # std 0.02, Adam's first steps grow them by ~5% each and the image is drowned out (tests/
                # test_vision_model.py's learning check, measured: no colour learned through the resampler).
                scale = 1.0 if name.endswith("resampler.latents") else out_std if is_out else std
                w = torch.randn(shape, generator=gen, dtype=torch.float32) * scale
                p.copy_(w.transpose(1, 2) if ".experts." in name else w)
        self.inv_freq.copy_(rope_inv_freq(self.cfg))

    def new_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> list[KVCache]:
        """One contiguous KV cache per layer, for `forward(..., ctx=ContiguousContext(cache, pos))` decoding."""
        p = self.tok_emb.weight
        return [KVCache(batch, max_len or self.cfg.max_seq_len, self.cfg.n_kv_head, self.cfg.head_dim,
                        dtype or p.dtype, p.device) for _ in self.blocks]

    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None, *,
                ctx: AttentionContext = None, positions_BT: torch.Tensor | None = None,
                logits_rows: torch.Tensor | None = None, vision: VisionInput | None = None) -> ModelOutput:
        """Logits (and the loss, given targets) of tokens idx_BT.

        ctx: what attention reads besides these tokens (moekit/model/attention.py): None, a contiguous
        cache, or a paged one. positions_BT: each token's position (default: consecutive from the
        context's start). logits_rows: rows of the flattened (B x T) batch to compute logits for (the
        serving engine wants a few of its T tokens), giving logits of shape (R, V). A pipeline stage without
        the embedding takes hidden states x_BTD as idx_BT; one without the head returns its hidden states.
        vision: the images these tokens attend to (moekit/model/vision.py); None = text only.
        """
        B, T = idx_BT.shape[:2]
        if positions_BT is None:
            start = ctx.start_pos if isinstance(ctx, ContiguousContext) else 0
            positions_BT = torch.arange(start, start + T, device=idx_BT.device).expand(B, T)
        # A pipeline stage after the first has no embedding: its input is the previous stage's hidden states
        # (moekit/parallel/pipeline.py deletes what a stage does not own, as torchtitan's pipeline split does).
        x_BTD = self.tok_emb(idx_BT) if self.tok_emb is not None else idx_BT
        cos, sin = rope_cos_sin(self.inv_freq, positions_BT)
        routing: list[RoutingInfo] = []
        xattn = self.xattn if vision is not None else None
        for key, block in self.blocks.items():
            if xattn is not None and key in xattn:
                x_BTD = xattn[key](x_BTD, vision)
            x_BTD, info = block(x_BTD, cos, sin, ctx)
            if info is not None:
                routing.append(info)
        if self.lm_head is None:  # a stage before the last: its hidden states go to the next stage
            return x_BTD
        if logits_rows is not None:
            x_BTD = x_BTD.reshape(B * T, -1).index_select(0, logits_rows)
        logits_BTV = self.lm_head(self.norm(x_BTD))
        out = ModelOutput(logits=logits_BTV, routing=routing)
        if routing and routing[0].aux_loss is not None:  # (not under inference mode: moe.py)
            out.aux_loss = torch.stack([r.aux_loss for r in routing]).mean()
            out.z_loss = torch.stack([r.z_loss for r in routing]).mean()
        if targets_BT is not None:
            # In at least fp32 (bf16 logits would round the softmax), never narrower than the logits: a float64
            # model's loss stays float64 (gradient checks, oracle comparisons).
            logits = logits_BTV.flatten(0, 1)
            out.ce_loss = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)),
                                          targets_BT.flatten(), ignore_index=-100)
            out.loss = out.ce_loss
            if out.aux_loss is not None:
                out.loss = out.loss + self.cfg.aux_loss_coef * out.aux_loss + self.cfg.z_loss_coef * out.z_loss
        return out

    def encode_images(self, pixels_ICHW: torch.Tensor) -> torch.Tensor:
        """Visual tokens (I, L, D) of a batch of images: the encoder and resampler, run once per image."""
        if self.vision is None:
            raise ValueError(f"model {self.cfg.name!r} has no vision encoder: it does not take images")
        return self.vision(pixels_ICHW)

    def cross_kv(self, visual_ILD: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Every cross-attention layer's K and V of these visual tokens: what the engine keeps per request."""
        return {layer.layer: layer.kv(visual_ILD) for layer in self.xattn.values()}

    def moe_layers(self) -> list[MoE]:
        return [b.mlp for b in self.blocks.values() if isinstance(b.mlp, MoE)]

    # ---- loading ----------------------------------------------------------------------------------
    @classmethod
    def from_tensors(cls, cfg: ModelConfig, tensors: dict[str, torch.Tensor], *, dtype: torch.dtype | None = None,
                     device: torch.device | str = "cpu", source: str = "the weights") -> Transformer:
        """A model holding `tensors` (a state dict, as a safetensors file or a converted HF folder gives),
        built on the meta device and assigned, so peak memory is one copy of the weights. The one loading
        path of moekit runs, Hugging Face folders and training checkpoints."""
        with torch.device("meta"):
            model = cls(cfg)
        model.load_tensors(tensors, source, dtype=dtype, device=device, assign=True)
        return model

    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str = "the weights", *,
                     dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                     assign: bool = False) -> None:
        """Check `tensors` against this model (names, shapes; old layouts renamed first), then copy them in
        (or, with assign, take them over: for a model built on the meta device). Raises ValueError naming
        `source` and what does not match."""
        tensors = upgrade_state_dict(tensors)
        if self.cfg.tie_embeddings and "lm_head.weight" not in tensors and "tok_emb.weight" in tensors:
            tensors["lm_head.weight"] = tensors["tok_emb.weight"]  # tied tensors are stored once
        expected = self.state_dict()
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{source} does not match the model's configuration (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}): was it saved from another configuration?")
        for name, t in tensors.items():
            if t.shape != expected[name].shape:
                raise ValueError(f"{source}: {name} has shape {tuple(t.shape)}, the configuration implies "
                                 f"{tuple(expected[name].shape)}")
        if assign:
            self.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}, assign=True)
            if self.cfg.tie_embeddings:  # assign=True made two Parameters of the shared tensor: one again
                self.lm_head.weight = self.tok_emb.weight
            self.inv_freq = rope_inv_freq(self.cfg).to(self.tok_emb.weight.device)  # never stored
        else:
            with torch.no_grad():
                for name, t in tensors.items():
                    expected[name].copy_(t)


# Weight names before the Experts module (moekit < 0.2): `blocks.{i}.mlp.w1` held (E, D, F), the
# transpose of today's `blocks.{i}.mlp.experts.w1` (E, F, D); w2 likewise. Old runs still load.
_LEGACY_EXPERT = re.compile(r"(blocks\.\d+\.mlp)\.(w[123])((?:::.*)?)$")


def upgrade_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of `tensors` with names (and `name::state` optimizer keys) of older moekit layouts renamed."""
    out = {}
    for name, t in tensors.items():
        m = _LEGACY_EXPERT.match(name)
        if m:
            name = f"{m[1]}.experts.{m[2]}{m[3]}"
            t = t.transpose(1, 2).contiguous() if t.dim() == 3 else t  # (a scalar optimizer `::step` stays)
        out[name] = t
    return out
