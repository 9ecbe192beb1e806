"""Vision, as GPT-4 is reported to have it (SPEC section 5): a separate encoder joined to the language
model by cross-attention, like Flamingo (Alayrac et al. 2022).

    pixels_ICHW -> VisionEncoder (ViT: patches, pre-norm blocks) -> PerceiverResampler (n_latents learned
    queries cross-attend to the patch features) -> a projection to the LM's width = visual tokens (I, L, D)

The language model is joined to them by `GatedCrossAttention` layers of their own, inserted before the
LM blocks listed in `cfg.cross_attn_layers` (Mllama's form, Llama 3.2 Vision: dedicated layers with an
attention gate and an MLP gate, not blocks glued inside existing ones, so the MoE blocks, pipeline
stages and tensor-parallel plans see ordinary layers). Each layer is

    x = x + tanh(attn_gate) * CrossAttn(norm(x), visual tokens of the token's image)
    x = x + tanh(mlp_gate) * MLP(norm(x))

with both gates initialised at 0 (Flamingo eq. 1), so a freshly added vision side leaves the text
model's function unchanged, bit for bit. Each text token attends only to the image of the most recent
`<image>` marker at or before it (Flamingo's masking, their Figure 7); a token with no image before it
is left exactly as it was (Mllama's `full_text_row_masked_out_mask`), so text-only requests run the text
model. Note the trap of gates at exactly 0: nothing upstream of a gate gets a gradient until the gate
moves (d tanh(g) o / d o = tanh(g) = 0); the gate's own gradient is <dL/dx, o>, and it is trained by a
loss over every text token (Flamingo's), after which the rest follows.

Shape legend: I images, C channels, P patches per image, L visual tokens (latents) per image, E encoder
width, D LM width, B batch, T tokens, N = B x T, H query heads, G KV heads, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import ModelConfig, VisionConfig
from moekit.model.attention import make_norm
from moekit.model.moe import MLP


@dataclass
class VisionInput:
    """What the cross-attention layers of one forward pass read.

    image_BT: for each token, the index (into the images of this batch) of the image it attends to,
    -1 for none. Either `visual_ILD` (each layer projects its own K/V: training) or `kv` (per layer,
    K and V already projected and kept per request: the serving engine's encoder cache).
    """

    image_BT: torch.Tensor
    visual_ILD: torch.Tensor | None = None
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None  # layer -> (k_ILGDh, v_ILGDh)


def image_index(idx_BT: torch.Tensor, image_token_id: int, first_image_B: torch.Tensor | None = None) -> torch.Tensor:
    """Flamingo's masking as indices: each token's image is the most recent marker at or before it in its row
    (row b's images are numbered from first_image_B[b], default: images of earlier rows come first); -1 if none."""
    is_marker_BT = idx_BT == image_token_id
    seen_BT = is_marker_BT.long().cumsum(1)  # markers at or before each token, per row
    if first_image_B is None:
        per_row_B = is_marker_BT.sum(1)
        first_image_B = per_row_B.cumsum(0) - per_row_B
    return torch.where(seen_BT > 0, seen_BT - 1 + first_image_B[:, None], -1)


# ---- the encoder: a ViT (Dosovitskiy et al. 2021) -------------------------------------------------------
class SelfAttention(nn.Module):
    """Bidirectional multi-head attention over an image's patches (ViT); biases as ViT/CLIP have them."""

    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.wqkv = nn.Linear(d, 3 * d)
        self.wo = nn.Linear(d, d)

    def forward(self, x_IPE: torch.Tensor) -> torch.Tensor:
        n_img, P, E = x_IPE.shape
        q, k, v = self.wqkv(x_IPE).view(n_img, P, 3, self.n_head, E // self.n_head).permute(2, 0, 3, 1, 4)
        return self.wo(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n_img, P, E))


class FeedForward(nn.Module):
    def __init__(self, d: int, d_ff: int, d_out: int | None = None):
        super().__init__()
        self.w1 = nn.Linear(d, d_ff)
        self.w2 = nn.Linear(d_ff, d_out or d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class EncoderBlock(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(v.d_model)
        self.attn = SelfAttention(v.d_model, v.n_head)
        self.mlp_norm = nn.LayerNorm(v.d_model)
        self.mlp = FeedForward(v.d_model, v.d_ff)

    def forward(self, x_IPE: torch.Tensor) -> torch.Tensor:
        x_IPE = x_IPE + self.attn(self.attn_norm(x_IPE))
        return x_IPE + self.mlp(self.mlp_norm(x_IPE))


class VisionEncoder(nn.Module):
    """Patches (a strided convolution = a linear map of each p x p patch) + learned positions, pre-norm blocks."""

    def __init__(self, v: VisionConfig):
        super().__init__()
        self.patch = nn.Conv2d(v.channels, v.d_model, kernel_size=v.patch_size, stride=v.patch_size)
        self.pos_emb = nn.Parameter(torch.zeros(v.n_patches, v.d_model))
        self.blocks = nn.ModuleList(EncoderBlock(v) for _ in range(v.n_layer))
        self.norm = nn.LayerNorm(v.d_model)

    def forward(self, pixels_ICHW: torch.Tensor) -> torch.Tensor:
        x_IPE = self.patch(pixels_ICHW).flatten(2).transpose(1, 2) + self.pos_emb
        for block in self.blocks:
            x_IPE = block(x_IPE)
        return self.norm(x_IPE)


# ---- the Perceiver Resampler (Flamingo section 2.1, Jaegle et al. 2021) ------------------------------------
class ResamplerLayer(nn.Module):
    """Latents attend to [patch features; latents] (Flamingo's Figure 5: keys and values are the
    concatenation, queries the latents), then a feed-forward; both residual."""

    def __init__(self, v: VisionConfig):
        super().__init__()
        self.n_head = v.n_head
        self.media_norm = nn.LayerNorm(v.d_model)
        self.latent_norm = nn.LayerNorm(v.d_model)
        self.wq = nn.Linear(v.d_model, v.d_model, bias=False)
        self.wkv = nn.Linear(v.d_model, 2 * v.d_model, bias=False)
        self.wo = nn.Linear(v.d_model, v.d_model, bias=False)
        self.mlp_norm = nn.LayerNorm(v.d_model)
        self.mlp = FeedForward(v.d_model, v.d_ff)

    def forward(self, x_IPE: torch.Tensor, lat_ILE: torch.Tensor) -> torch.Tensor:
        n_img, L, E = lat_ILE.shape
        h, dh = self.n_head, E // self.n_head
        lat_n = self.latent_norm(lat_ILE)
        kv_in = torch.cat([self.media_norm(x_IPE), lat_n], dim=1)
        q = self.wq(lat_n).view(n_img, L, h, dh).transpose(1, 2)
        k, v = self.wkv(kv_in).view(n_img, -1, 2, h, dh).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n_img, L, E)
        lat_ILE = lat_ILE + self.wo(o)
        return lat_ILE + self.mlp(self.mlp_norm(lat_ILE))


class PerceiverResampler(nn.Module):
    """A fixed number of visual tokens per image, whatever its patch count."""

    def __init__(self, v: VisionConfig):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(v.n_latents, v.d_model))
        self.layers = nn.ModuleList(ResamplerLayer(v) for _ in range(v.resampler_layers))
        self.norm = nn.LayerNorm(v.d_model)

    def forward(self, x_IPE: torch.Tensor) -> torch.Tensor:
        lat_ILE = self.latents.expand(x_IPE.shape[0], -1, -1)
        for layer in self.layers:
            lat_ILE = layer(x_IPE, lat_ILE)
        return self.norm(lat_ILE)


class VisionModel(nn.Module):
    """pixels (I, C, H, W) -> visual tokens (I, L, D) in the language model's width."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        v = cfg.vision
        self.encoder = VisionEncoder(v)
        self.resampler = PerceiverResampler(v)
        self.proj = nn.Linear(v.d_model, cfg.d_model)  # Mllama's multi_modal_projector

    def forward(self, pixels_ICHW: torch.Tensor) -> torch.Tensor:
        return self.proj(self.resampler(self.encoder(pixels_ICHW.to(self.proj.weight.dtype))))


# ---- the language model side: gated cross-attention layers ----------------------------------------------
class CrossAttention(nn.Module):
    """Text queries (H heads) over one image's visual tokens (G KV heads, as the LM's attention: MQA for
    GPT-4), no positions (Flamingo: the resampler's latents are an unordered set)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.q_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_dim, bias=False)
        self.wo = nn.Linear(cfg.q_dim, cfg.d_model, bias=False)

    def kv(self, visual_ILD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of each image's visual tokens, (I, G, L, Dh): computed once per image and kept."""
        n_img, L, _ = visual_ILD.shape
        k = self.wk(visual_ILD).view(n_img, L, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.wv(visual_ILD).view(n_img, L, self.n_kv_head, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x_ND: torch.Tensor, image_N: torch.Tensor, k_IGLDh: torch.Tensor,
                v_IGLDh: torch.Tensor) -> torch.Tensor:
        """Each of the N tokens attends to the L visual tokens of its own image (image_N >= 0)."""
        N = x_ND.shape[0]
        q_NH1Dh = self.wq(x_ND).view(N, self.n_head, 1, self.head_dim)
        # One query per "batch" row, its image's K/V gathered: a token's result depends on its own image only,
        # whatever else the batch holds (the engine's batch-invariance test swaps batch mates' images).
        k_NGLDh, v_NGLDh = k_IGLDh[image_N], v_IGLDh[image_N]
        o_NH1Dh = F.scaled_dot_product_attention(q_NH1Dh, k_NGLDh.to(q_NH1Dh.dtype), v_NGLDh.to(q_NH1Dh.dtype),
                                                 enable_gqa=self.n_kv_head != self.n_head)
        return self.wo(o_NH1Dh.reshape(N, self.n_head * self.head_dim))


class GatedCrossAttention(nn.Module):
    """One gated cross-attention layer before LM block `layer` (Flamingo's GATED XATTN-DENSE, Mllama's
    MllamaCrossAttentionDecoderLayer): tanh-gated cross-attention, then a tanh-gated dense MLP."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = make_norm(cfg)
        self.attn = CrossAttention(cfg)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg.replace(bias=False), cfg.dense_d_ff)
        self.mlp_gate = nn.Parameter(torch.zeros(1))

    def kv(self, visual_ILD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Visual tokens come normalised from the resampler: no norm before K/V (Flamingo).
        return self.attn.kv(visual_ILD)

    def forward(self, x_BTD: torch.Tensor, vision: VisionInput) -> torch.Tensor:
        B, T, D = x_BTD.shape
        image_N = vision.image_BT.reshape(-1)
        has_N1 = (image_N >= 0)[:, None]
        if not bool(has_N1.any()):
            return x_BTD  # no token sees an image: exactly the text model
        if vision.kv is not None:
            k_IGLDh, v_IGLDh = vision.kv[self.layer]
        else:
            k_IGLDh, v_IGLDh = self.kv(vision.visual_ILD)
        x_ND = x_BTD.reshape(B * T, D)
        mask_N1 = has_N1.to(x_ND.dtype)  # rows without an image get exactly 0 from both branches
        o_ND = self.attn(self.attn_norm(x_ND), image_N.clamp(min=0), k_IGLDh, v_IGLDh) * mask_N1
        x_ND = x_ND + torch.tanh(self.attn_gate).to(x_ND.dtype) * o_ND
        h_ND = self.mlp(self.mlp_norm(x_ND))[0] * mask_N1
        x_ND = x_ND + torch.tanh(self.mlp_gate).to(x_ND.dtype) * h_ND
        return x_ND.view(B, T, D)


__all__ = ["CrossAttention", "GatedCrossAttention", "PerceiverResampler", "VisionEncoder", "VisionInput",
           "VisionModel", "image_index"]
