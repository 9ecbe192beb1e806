"""The vision side's costs (SPEC section 5): its parameters on top of the text model, FLOPs per image, the
encoder cache a request keeps, the compute of the ~2T-token vision fine-tune, and the article's IO claim.

    from moekit.plan.vision import vision_plan
    v = vision_plan("gpt4-vision")
    v.params.share, v.image_flops.total, v.cache.per_request, v.finetune.flops, v.io.ratio   # 1.4%, ..., 147x
    moekit plan vision --model gpt4-vision [--json]         # these figures
    moekit plan --model gpt4-vision                         # the GPT-4 report with its section 5

Figures come from `moekit.counts` (held equal to the built model and to torch's FLOP counter by
tests/test_vision_counts.py). What the article does not say is an assumption, stated beside it:

- images per token in the fine-tune: Flamingo's interleaved web pages (M3W) are sampled as 256 text tokens
  with up to 5 images (Alayrac et al. 2022), so at most 5 / 256 images per text token (`IMAGES_PER_TOKEN`);
- the fine-tune trains everything (6 FLOPs per parameter per text token, 3 x the forward FLOPs per image), an
  upper bound: Flamingo freezes the encoder and the LM, which skips their weight gradients;
- text IO: ~4 bytes per token. cl100k_base tokens are ~4 characters of English (OpenAI's rule of thumb, "What
  are tokens and how to count them?": "one token generally corresponds to ~4 characters of text for common
  English text"), 1 byte each in UTF-8, and the article's own ~4;
- image IO: a token is one of the encoder's patches, read as raw 8-bit RGB: 14 x 14 x 3 = 588 bytes for a
  ViT-*/14 (the article's ~600). What the LM attends to, a resampled visual token, stands for n_patches /
  n_latents patches (9 for gpt4-vision), so per visual token the ratio is that many times larger.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moekit.config import ModelConfig
from moekit.counts import (
    ImageFlops,
    count_params,
    encoder_cache_bytes,
    flops_per_token,
    kv_bytes_per_token,
    vision_flops_per_image,
)
from moekit.plan.hardware import DTYPE_BYTES, get_gpu
from moekit.plan.layout import as_config

ARTICLE_IO_RATIO = 150  # SPEC section 5: "~150x the IO of text (~600 bytes per token vs ~4)"
IO_TOLERANCE = 0.10  # the ratio agrees with the article's within 10%
TEXT_BYTES_PER_TOKEN = 4.0  # UTF-8 bytes per cl100k token (module docstring)
FINETUNE_TOKENS = 2e12  # SPEC section 5: "fine-tuned on ~2T more tokens"
PRETRAIN_TOKENS = 13e12  # SPEC section 3
IMAGES_PER_TOKEN = 5 / 256  # Flamingo's M3W: up to 5 images per 256-token sequence (an upper bound)


@dataclass
class VisionParams:
    encoder: int
    resampler: int
    projector: int
    cross_attn: int  # the gated cross-attention layers (LM side)
    n_cross_layers: int
    total: int  # all four
    text: int  # the text model they sit on top of
    active_per_token: int  # what a text token that sees an image multiplies by (the cross-attention included)
    text_active_per_token: int  # the same model without vision

    @property
    def share(self) -> float:
        """Vision parameters as a fraction of the text model's (SPEC: 'on top of the 1.8T')."""
        return self.total / self.text


@dataclass
class EncoderCache:
    """Bytes a request keeps for its images (moekit/infer/encoder_cache.py): cross-attention K/V of its visual
    tokens, n_cross x 2 x n_latents x n_kv_head x head_dim per image; they do not grow with the text."""

    dtype: str
    per_image: float
    max_images: int
    per_request: float  # with max_images images
    text_kv_per_token: float  # the paged KV cache's bytes per text token, for scale
    text_kv_window: float  # ... for a full max_seq_len window


@dataclass
class FineTune:
    tokens: float  # text tokens
    images_per_token: float
    images: float
    text_flops: float  # 3 x forward per text token (cross-attention included) x tokens
    image_flops: float  # 3 x FLOPs per image x images
    pretrain_flops: float  # the text-only model's 6 x N x 13T (SPEC section 3)
    gpu: str
    n_gpus: int
    mfu: float
    days: float  # on n_gpus at mfu of the bf16 peak

    @property
    def flops(self) -> float:
        return self.text_flops + self.image_flops

    @property
    def share(self) -> float:
        """The fine-tune's compute as a fraction of the text pre-training's."""
        return self.flops / self.pretrain_flops


@dataclass
class ImageIO:
    text_bytes_per_token: float
    patch_bytes: int  # one patch token: patch_size^2 x channels bytes of 8-bit pixels
    image_bytes: int  # one whole image, raw
    n_patches: int
    n_latents: int
    article_ratio: float = ARTICLE_IO_RATIO

    @property
    def ratio(self) -> float:
        return self.patch_bytes / self.text_bytes_per_token

    @property
    def per_visual_token(self) -> float:
        """Raw bytes behind each resampled token the LM attends to."""
        return self.image_bytes / self.n_latents

    @property
    def agrees(self) -> bool:
        return abs(self.ratio / self.article_ratio - 1) <= IO_TOLERANCE


@dataclass
class VisionPlan:
    model: str
    image_size: int
    patch_size: int
    params: VisionParams
    image_flops: ImageFlops  # forward, once per image
    text_token_flops: float  # forward matmul FLOPs of one text token, for scale
    cache: EncoderCache
    finetune: FineTune
    io: ImageIO

    @property
    def image_in_text_tokens(self) -> float:
        """One image's encoding costs as much as this many text tokens' forward passes."""
        return self.image_flops.total / self.text_token_flops

    def to_dict(self) -> dict:
        d = asdict(self)
        d["params"]["share"] = self.params.share
        d["image_flops"] = self.image_flops.as_dict()
        d["image_in_text_tokens"] = self.image_in_text_tokens
        d["finetune"].update(flops=self.finetune.flops, share=self.finetune.share)
        d["io"].update(ratio=self.io.ratio, per_visual_token=self.io.per_visual_token, agrees=self.io.agrees)
        return d


def vision_plan(model: ModelConfig | str = "gpt4-vision", *, finetune_tokens: float = FINETUNE_TOKENS,
                images_per_token: float = IMAGES_PER_TOKEN, pretrain_tokens: float = PRETRAIN_TOKENS,
                gpu: str = "A100-80GB", n_gpus: int = 25_000, mfu: float = 0.34, cache_dtype: str = "bf16",
                text_bytes_per_token: float = TEXT_BYTES_PER_TOKEN, hardware_files: tuple = ()) -> VisionPlan:
    """The vision figures of `model` (a vision config); see the module docstring for the assumptions."""
    cfg = as_config(model)
    if not cfg.has_vision:
        raise ValueError(f"model {cfg.name!r} has no vision side (its config's vision is None): plan a vision "
                         "model, e.g. --model gpt4-vision")
    for name, value in (("finetune tokens", finetune_tokens), ("pretrain tokens", pretrain_tokens),
                        ("text bytes per token", text_bytes_per_token), ("--mfu", mfu), ("--gpus", n_gpus)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if images_per_token < 0 or mfu > 1:
        raise ValueError(f"need images per token >= 0 and 0 < --mfu <= 1, got {images_per_token} and {mfu}")
    if cache_dtype not in DTYPE_BYTES:
        raise ValueError(f"cache dtype {cache_dtype!r}: choose one of {', '.join(DTYPE_BYTES)}")
    v, c = cfg.vision, count_params(cfg)
    text_cfg = cfg.replace(vision=None)
    text = count_params(text_cfg)
    params = VisionParams(encoder=c.vision_encoder, resampler=c.vision_resampler, projector=c.vision_projector,
                          cross_attn=c.cross_attn, n_cross_layers=len(cfg.cross_attn_layers), total=c.vision,
                          text=c.text, active_per_token=c.active_per_token, text_active_per_token=text.active)

    nbytes = DTYPE_BYTES[cache_dtype]
    per_image = encoder_cache_bytes(cfg, nbytes)
    kv_token = kv_bytes_per_token(cfg, nbytes)
    cache = EncoderCache(dtype=cache_dtype, per_image=per_image, max_images=v.max_images,
                         per_request=per_image * v.max_images, text_kv_per_token=kv_token,
                         text_kv_window=kv_token * cfg.max_seq_len)

    image = vision_flops_per_image(cfg)
    token = flops_per_token(cfg)
    images = finetune_tokens * images_per_token
    text_flops = 3 * (token.matmul + token.cross_attention) * finetune_tokens
    image_flops = 3 * image.total * images
    pretrain = 3 * flops_per_token(text_cfg).matmul * pretrain_tokens
    hw = get_gpu(gpu, files=hardware_files)
    days = (text_flops + image_flops) / (n_gpus * hw.peak_flops("bf16") * mfu) / 86_400
    finetune = FineTune(tokens=finetune_tokens, images_per_token=images_per_token, images=images,
                        text_flops=text_flops, image_flops=image_flops, pretrain_flops=pretrain, gpu=hw.name,
                        n_gpus=n_gpus, mfu=mfu, days=days)

    io = ImageIO(text_bytes_per_token=text_bytes_per_token, patch_bytes=v.patch_size ** 2 * v.channels,
                 image_bytes=v.image_size ** 2 * v.channels, n_patches=v.n_patches, n_latents=v.n_latents)
    return VisionPlan(model=cfg.name, image_size=v.image_size, patch_size=v.patch_size, params=params,
                      image_flops=image, text_token_flops=token.matmul, cache=cache, finetune=finetune, io=io)


def _n(x: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:,.3g} {suffix}{unit}" if unit else f"{x / scale:,.3g}{suffix}"
    return f"{x:,.0f} {unit}".strip()


def format_vision(p: VisionPlan) -> str:
    """`moekit plan vision`'s text: one line per figure."""
    w, f, c, ft, io = p.params, p.image_flops, p.cache, p.finetune, p.io
    return "\n".join([
        f"vision of {p.model}: {p.image_size} x {p.image_size} px images in {io.n_patches} patches of "
        f"{p.patch_size} x {p.patch_size}, {io.n_latents} visual tokens each, {w.n_cross_layers} cross-attention "
        "layers",
        f"  parameters           {_n(w.total)} on top of {_n(w.text)} ({w.share:.2%}): encoder {_n(w.encoder)}, "
        f"resampler {_n(w.resampler)}, projector {_n(w.projector)}, cross-attention {_n(w.cross_attn)}",
        f"  active per token     {_n(w.active_per_token)} for a text token that sees an image ("
        f"{_n(w.text_active_per_token)} text only)",
        f"  FLOPs per image      {_n(f.total, 'FLOP')} forward, once per image: encoder {_n(f.encoder, 'FLOP')}, "
        f"resampler {_n(f.resampler, 'FLOP')}, projector {_n(f.projector, 'FLOP')}, cross-attention K/V "
        f"{_n(f.cross_kv, 'FLOP')} (= {p.image_in_text_tokens:,.1f} text tokens)",
        f"  encoder cache        {_n(c.per_image, 'B')} per image ({c.dtype}), {_n(c.per_request, 'B')} for a "
        f"request of {c.max_images}; the text KV cache holds {_n(c.text_kv_per_token, 'B')} per token",
        f"  fine-tune            {ft.flops:.3g} FLOPs for {_n(ft.tokens)} tokens and {_n(ft.images)} images "
        f"({ft.share:.1%} of the {ft.pretrain_flops:.3g} of pre-training): {ft.days:,.3g} days on "
        f"{ft.n_gpus:,} x {ft.gpu} at {ft.mfu:.0%} MFU",
        f"  IO per token         image {io.patch_bytes} B (a raw {p.patch_size} x {p.patch_size} RGB patch) vs "
        f"text {io.text_bytes_per_token:g} B: {io.ratio:.0f}x (article ~{io.article_ratio:g}x: "
        f"{'agrees' if io.agrees else 'DISAGREES'}); per visual token {io.per_visual_token:,.0f} B",
    ])


__all__ = ["ARTICLE_IO_RATIO", "FINETUNE_TOKENS", "IMAGES_PER_TOKEN", "TEXT_BYTES_PER_TOKEN", "VisionPlan",
           "format_vision", "vision_plan"]
