"""Named model configurations: `PRESETS[name]` is a ModelConfig. `moekit info NAME` prints its card.

The `gpt4` shape is not in the article (SPEC section 2 gives only counts); it is the consistent
shape SPEC derives: d_model 10,752 with a plain 4 x d GELU MLP gives 8 d^2 = 925M per expert per
layer, x 120 layers = 111B per expert; multi-query attention with a query/output width of 2 x d
gives ~4 d^2 = 55.5B of attention. `tests/test_counts.py` holds each count to the article's figure.

`gpt4-vision` is gpt4 with a vision side (SPEC section 5). The article gives no size for it, only its form (a
separate encoder, Flamingo-style cross-attention, parameters on top of the 1.8T): the shape below is published
numbers chosen by moekit, an assumption throughout (see its comment).
"""

from __future__ import annotations

from moekit.config import ModelConfig, VisionConfig

CL100K_VOCAB = 100_277  # GPT-4's tokenizer (cl100k_base), SPEC section 2

_GPT4 = dict(
    vocab_size=CL100K_VOCAB, n_layer=120, d_model=10_752,
    n_head=168, head_dim=128, n_kv_head=1,  # MQA; 168 x 128 = 21,504 = 2 x d_model
    d_ff=4 * 10_752, n_expert=16, top_k=2, mlp="gelu", norm="rmsnorm",
)

_TINY = dict(vocab_size=4096, n_layer=4, d_model=128, n_head=4, head_dim=64, n_kv_head=1, d_ff=512, n_expert=8,
             top_k=2, mlp="gelu", tie_embeddings=True, max_seq_len=256)

# The vision side of gpt4-vision. ASSUMPTIONS, not the article's (SPEC section 5 gives no size): the encoder is
# OpenAI's own published CLIP ViT-L/14 at 336 px (Radford et al. 2021, its table of CLIP-ViT hyperparameters:
# 24 layers, width 1,024, 16 heads, MLP 4 x 1,024; 576 patches of 14 x 14; ~0.3B parameters); the resampler is
# Flamingo's, 64 latents and 6 layers (Alayrac et al. 2022, appendix B); a gated cross-attention layer before every
# 7th of the 120 LM blocks, as Flamingo-80B inserts one every 7th of its 80 layers: 18 layers. The <image> marker
# has no id in cl100k_base: the tokenizer adds it at stage 2 (-1 = unassigned).
_GPT4_VISION = VisionConfig(image_size=336, patch_size=14, n_layer=24, d_model=1024, n_head=16, d_ff=4096,
                            n_latents=64, resampler_layers=6, cross_attn_every=7, image_token_id=-1)

PRESETS: dict[str, ModelConfig] = {
    # SPEC section 2: 120 layers, 16 experts of ~111B, top-2, MQA, 8k pre-training context.
    "gpt4": ModelConfig(name="gpt4", **_GPT4, max_seq_len=8192),
    # "The 32k model is a fine-tune of the 8k one": same weights, RoPE positions interpolated 4x.
    "gpt4-32k": ModelConfig(name="gpt4-32k", **_GPT4, max_seq_len=32_768,
                            rope_scaling={"rope_type": "linear", "factor": 4.0}),
    # Davinci (Brown et al. 2020, table 2.1): 96 layers, d 12,288, 96 heads of 128, 2k context.
    # GPT-3 used learned positions; moekit uses RoPE, which has no parameters (25M fewer, 0.01%).
    "gpt3-175b": ModelConfig(name="gpt3-175b", vocab_size=50_257, n_layer=96, d_model=12_288, n_head=96,
                             n_kv_head=96, d_ff=4 * 12_288, mlp="gelu", norm="layernorm", bias=True,
                             tie_embeddings=True, max_seq_len=2048),
    # SPEC section 1's brick-wall example: a 1T-parameter dense model (12 L d^2 = 1.0T).
    "dense-1t": ModelConfig(name="dense-1t", vocab_size=CL100K_VOCAB, n_layer=128, d_model=25_600,
                            n_head=200, n_kv_head=200, d_ff=4 * 25_600, mlp="gelu", max_seq_len=8192),
    # mistralai/Mixtral-8x7B-v0.1 config.json, so an HF Mixtral checkpoint maps onto a preset.
    "mixtral-8x7b": ModelConfig(name="mixtral-8x7b", vocab_size=32_000, n_layer=32, d_model=4096, n_head=32,
                                n_kv_head=8, d_ff=14_336, n_expert=8, top_k=2, mlp="swiglu",
                                rope_theta=1e6, max_seq_len=32_768, aux_loss_coef=0.02),
    # gpt4's ratios (16 experts, top-2, MQA, 4 x d GELU experts, 2 x d attention width) at CPU size:
    # ~281M total, ~46M active. Embeddings are tied so that they do not dominate the active count.
    "gpt4-mini": ModelConfig(name="gpt4-mini", vocab_size=8192, n_layer=8, d_model=512, n_head=16,
                             head_dim=64, n_kv_head=1, d_ff=2048, n_expert=16, top_k=2, mlp="gelu",
                             tie_embeddings=True, max_seq_len=1024),
    # The CPU default: ~5M parameters, 8 experts, top-2, MQA; trains in minutes on 2 cores.
    "tiny": ModelConfig(name="tiny", **_TINY),
    # SPEC section 5 on gpt4: the vision side above (its sizes are assumptions), on top of the 1.8T text model.
    "gpt4-vision": ModelConfig(name="gpt4-vision", **_GPT4, max_seq_len=8192, vision=_GPT4_VISION),
    # tiny + a small vision side for tests and the CPU recipe: 32-px images in 16 patches of 8, a 2-layer encoder
    # 128 wide, 16 visual tokens per image, cross-attention before blocks 0 and 2.
    "tiny-vision": ModelConfig(name="tiny-vision", **_TINY,
                               vision=VisionConfig(image_size=32, patch_size=8, n_layer=2, d_model=128, n_head=4,
                                                   d_ff=512, n_latents=16, cross_attn_every=2, image_token_id=-1)),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name].replace()  # a copy: callers may change it
