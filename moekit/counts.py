"""Analytic counts of a ModelConfig: parameters (total, active, by component), FLOPs and KV-cache bytes.

Pure arithmetic on the config, no torch: the planner (`moekit.plan`) and `moekit info` use these,
and `tests/test_counts.py` checks that they equal `sum(p.numel())` of the built model for every preset
(tests/test_vision_counts.py for vision configs, and FLOPs against torch's FLOP counter).

Conventions (SPEC section 6):
- *active* parameters are those a token uses: everything except the (n_expert - top_k) experts it
  is not routed to. The input embedding counts as active (it is read), as is common practice.
- forward FLOPs per token = 2 x (active parameters that enter a matmul) = 2 x (active - input
  embedding) (Kaplan et al. 2020, table 1). The attention score/value FLOPs, which grow with
  context, are reported apart: 4 x n_layer x context x n_head x head_dim (QK^T and AV, 2 FLOPs each
  per multiply-add).

Vision (SPEC section 5, moekit/model/vision.py) adds its own entries: the encoder (ViT), the Perceiver
resampler, the projector to the LM's width, and the gated cross-attention layers. `total` and `active`
hold all of them (the cross-attention layers are dense, and a token with an image uses them all), but
part of the vision side runs once per *image*, not per token: the encoder, resampler and projector, and
each cross-attention layer's K/V projections of the visual tokens (`per_image`). `active_per_token` leaves
those out; it is what FLOPs per token count, and `vision_flops_per_image` counts the rest. For a
text-only config every vision entry is 0 and `active_per_token == active`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moekit.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    embedding: int  # input token embedding
    lm_head: int  # 0 when tied to the embedding
    attention: int  # q, k, v, o projections (+ biases), all layers
    experts: int  # all experts of all MoE layers
    per_expert: int  # one expert's MLP summed over the MoE layers (SPEC: ~111B for GPT-4)
    dense_mlp: int  # MLPs of non-MoE layers
    router: int
    norms: int
    vision_encoder: int  # ViT: patch projection, positions, blocks, final norm
    vision_resampler: int  # Perceiver resampler: latents, layers, final norm
    vision_projector: int  # encoder width -> LM width
    cross_attn: int  # the gated cross-attention layers on the LM side (norms, wq/wk/wv/wo, gates, MLP)
    per_image: int  # run once per image: encoder + resampler + projector + cross-attention wk/wv
    total: int
    active: int  # parameters one token uses (top_k of n_expert experts; with its image, the vision side)
    active_per_token: int  # active - per_image: what each token multiplies by (FLOPs per token)

    @property
    def vision(self) -> int:
        """Everything vision adds on top of the text model (SPEC section 5: 'on top of the 1.8T')."""
        return self.vision_encoder + self.vision_resampler + self.vision_projector + self.cross_attn

    @property
    def text(self) -> int:
        return self.total - self.vision

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _mlp_params(d_model: int, d_ff: int, mlp: str, bias: bool) -> int:
    n_mat = 3 if mlp == "swiglu" else 2
    n = n_mat * d_model * d_ff
    if bias:
        n += (n_mat - 1) * d_ff + d_model
    return n


def _vision_params(cfg: ModelConfig) -> tuple[int, int, int, int, int]:
    """(encoder, resampler, projector, cross-attention layers, their K/V projections) of moekit/model/vision.py."""
    v = cfg.vision
    if v is None:
        return 0, 0, 0, 0, 0
    E, F = v.d_model, v.d_ff
    layer_norm = 2 * E  # nn.LayerNorm: weight and bias
    ff = E * F + F + F * E + E  # FeedForward: w1 and w2 with biases
    # ViT (Dosovitskiy et al. 2021): a biased patch convolution, learned positions, pre-norm blocks with biased
    # qkv/o projections, a final norm.
    block = 2 * layer_norm + (E * 3 * E + 3 * E) + (E * E + E) + ff
    encoder = v.channels * v.patch_size ** 2 * E + E + v.n_patches * E + v.n_layer * block + layer_norm
    # Resampler layer: media, latent and MLP norms, bias-free wq / wkv / wo, the feed-forward.
    layer = 3 * layer_norm + E * E + 2 * E * E + E * E + ff
    resampler = v.n_latents * E + v.resampler_layers * layer + layer_norm
    projector = E * cfg.d_model + cfg.d_model
    # Cross-attention layer (LM side): two LM-type norms, bias-free wq/wk/wv/wo, two scalar tanh gates, and a
    # bias-free dense MLP of the LM's kind and dense_d_ff.
    d = cfg.d_model
    kv = 2 * d * cfg.kv_dim
    norm_size = 2 * d if cfg.norm == "layernorm" and cfg.bias else d
    xattn = 2 * norm_size + d * cfg.q_dim + kv + cfg.q_dim * d + 2 + _mlp_params(d, cfg.dense_d_ff, cfg.mlp, False)
    n = len(cfg.cross_attn_layers)
    return encoder, resampler, projector, n * xattn, n * kv


def count_params(cfg: ModelConfig) -> ParamCounts:
    d = cfg.d_model
    attn_layer = d * cfg.q_dim + 2 * d * cfg.kv_dim + cfg.q_dim * d
    if cfg.bias:
        attn_layer += cfg.q_dim + 2 * cfg.kv_dim + d
    norm_size = 2 * d if cfg.norm == "layernorm" and cfg.bias else d
    n_moe = cfg.n_moe_layers
    n_dense = cfg.n_layer - n_moe

    per_expert = n_moe * _mlp_params(d, cfg.d_ff, cfg.mlp, bias=False)
    experts = cfg.n_expert * per_expert if cfg.is_moe else 0
    dense_mlp = n_dense * _mlp_params(d, cfg.dense_d_ff, cfg.mlp, cfg.bias)
    router = n_moe * cfg.n_expert * d
    embedding = cfg.vocab_size * d
    lm_head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    attention = cfg.n_layer * attn_layer
    norms = (2 * cfg.n_layer + 1) * norm_size
    encoder, resampler, projector, cross_attn, cross_kv = _vision_params(cfg)
    per_image = encoder + resampler + projector + cross_kv
    total = (embedding + lm_head + attention + experts + dense_mlp + router + norms
             + encoder + resampler + projector + cross_attn)
    active = total - (cfg.n_expert - cfg.top_k) * per_expert if cfg.is_moe else total
    return ParamCounts(embedding=embedding, lm_head=lm_head, attention=attention, experts=experts,
                       per_expert=per_expert if cfg.is_moe else 0, dense_mlp=dense_mlp, router=router,
                       norms=norms, vision_encoder=encoder, vision_resampler=resampler, vision_projector=projector,
                       cross_attn=cross_attn, per_image=per_image, total=total, active=active,
                       active_per_token=active - per_image)


@dataclass(frozen=True)
class FlopCounts:
    matmul: int  # 2 x active matmul parameters: independent of context
    attention: int  # QK^T and AV at the given context
    context: int
    cross_attention: int = 0  # QK^T and AV over the n_latents visual tokens of the token's image (vision)

    @property
    def total(self) -> int:
        return self.matmul + self.attention + self.cross_attention


def flops_per_token(cfg: ModelConfig, context: int = 0) -> FlopCounts:
    """Forward FLOPs for one token that attends to `context` tokens (training: x3 for fwd + bwd).

    For a vision model, a text token that sees an image: its cross-attention layers included (dense, always
    active for such tokens), the work done once per image not (`vision_flops_per_image`)."""
    c = count_params(cfg)
    # The input embedding is a lookup, not a matmul; a tied embedding is still read by the lm_head.
    matmul_params = c.active_per_token - c.embedding + (c.embedding if cfg.tie_embeddings else 0)
    attention = 4 * cfg.n_layer * context * cfg.q_dim
    n_latents = cfg.vision.n_latents if cfg.has_vision else 0
    cross = 4 * len(cfg.cross_attn_layers) * n_latents * cfg.q_dim
    return FlopCounts(matmul=2 * matmul_params, attention=attention, context=context, cross_attention=cross)


@dataclass(frozen=True)
class ImageFlops:
    """Forward FLOPs of one image, run once however many tokens attend to it: matmuls (2 per multiply-add) and
    attention scores; biases, norms and activations (a few per element, not per weight) left out, as torch's
    FLOP counter leaves them out (tests/test_vision_counts.py holds the two equal)."""

    encoder: int  # patch projection (a strided convolution = a matmul per patch), blocks
    resampler: int
    projector: int
    cross_kv: int  # every cross-attention layer's K and V of the image's visual tokens

    @property
    def total(self) -> int:
        return self.encoder + self.resampler + self.projector + self.cross_kv

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def vision_flops_per_image(cfg: ModelConfig) -> ImageFlops:
    """Forward FLOPs to encode one image and project its visual tokens' K/V (moekit/model/vision.py)."""
    v = cfg.vision
    if v is None:
        return ImageFlops(0, 0, 0, 0)
    E, F, P, L = v.d_model, v.d_ff, v.n_patches, v.n_latents
    patch = 2 * P * v.channels * v.patch_size ** 2 * E
    # ViT block over P patches: qkv (3E^2), o (E^2), MLP (2EF) per patch; scores QK^T and AV (2 P^2 E each).
    block = 2 * P * (3 * E * E + E * E + 2 * E * F) + 4 * P * P * E
    # Resampler layer: L latent queries, keys and values of the P patches and the L latents (Flamingo figure 5).
    layer = 2 * L * E * E + 2 * (P + L) * 2 * E * E + 2 * L * E * E + 4 * L * (P + L) * E + 2 * L * 2 * E * F
    cross_kv = len(cfg.cross_attn_layers) * 2 * L * cfg.d_model * 2 * cfg.kv_dim
    return ImageFlops(encoder=patch + v.n_layer * block, resampler=v.resampler_layers * layer,
                      projector=2 * L * E * cfg.d_model, cross_kv=cross_kv)


def encoder_cache_bytes(cfg: ModelConfig, bytes_per_element: float = 2, images: int = 1) -> float:
    """Bytes of the encoder cache (moekit/infer/encoder_cache.py) for `images` images of one request: every
    cross-attention layer keeps K and V of each image's visual tokens, n_cross x 2 x n_latents x n_kv_head x
    head_dim elements per image. They do not grow with the text (0 for a text-only model)."""
    if not cfg.has_vision:
        return 0.0
    n = len(cfg.cross_attn_layers)
    return images * n * 2 * cfg.vision.n_latents * cfg.n_kv_head * cfg.head_dim * bytes_per_element


def kv_bytes_per_token(cfg: ModelConfig, bytes_per_element: float = 2, n_kv_head: int | None = None) -> float:
    """KV-cache bytes for one token: 2 (K and V) x layers x KV heads x head_dim x bytes (SPEC section 6).

    `n_kv_head` overrides the config's, e.g. `n_kv_head=cfg.n_head` for what full MHA would need.
    """
    kv_heads = cfg.n_kv_head if n_kv_head is None else n_kv_head
    return 2 * cfg.n_layer * kv_heads * cfg.head_dim * bytes_per_element


def weight_bytes(cfg: ModelConfig, bytes_per_param: float, active: bool = False) -> float:
    c = count_params(cfg)
    return (c.active if active else c.total) * bytes_per_param
