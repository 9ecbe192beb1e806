"""Vision counts (moekit/counts.py, SPEC section 5): parameters equal to the built model's, module by module, for
vision configs of several shapes; FLOPs per token and per image equal to torch's FLOP counter over real forward
passes; the encoder cache equal to the bytes of the K/V the model really produces; text-only counts untouched;
`moekit info` prints the vision side only for vision configs.

Oracles: `sum(p.numel())` of `Transformer(cfg)` on the meta device (its submodules, not the config), and torch's
FlopCounterMode with the math attention kernel (which counts every matmul, attention scores included).
"""

import json

import pytest
import torch
from conftest import tiny_cfg
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from moekit.cli import main
from moekit.config import VisionConfig
from moekit.counts import count_params, encoder_cache_bytes, flops_per_token, vision_flops_per_image
from moekit.model.transformer import Transformer
from moekit.model.vision import VisionInput, image_index
from moekit.presets import PRESETS, get_preset

SMALL_VISION = dict(image_size=16, patch_size=4, n_layer=2, d_model=24, n_head=3, d_ff=40, n_latents=5,
                    resampler_layers=2, image_token_id=1)


def vision_cfg(vision: dict | None = None, **overrides):
    return tiny_cfg(vision=VisionConfig(**{**SMALL_VISION, **(vision or {})}), **overrides)


SHAPES = {
    "moe_swiglu_every_1": vision_cfg(),  # tiny_cfg: a dense and a SwiGLU MoE layer, GQA 4:2
    "moe_gelu_every_2": vision_cfg(dict(cross_attn_every=2), n_layer=4, mlp="gelu"),
    "dense_layernorm_bias": vision_cfg(dict(cross_attn_every=2), n_layer=3, n_expert=1, top_k=1, norm="layernorm",
                                       bias=True, mlp="gelu"),
    "explicit_layers_mqa_tied": vision_cfg(dict(cross_attn_layers=[3, 1], n_latents=3), n_layer=4, n_kv_head=1,
                                           tie_embeddings=True, dense_d_ff=20, moe_every=1),
    "untied_wide_heads": vision_cfg(dict(patch_size=8, n_head=2), head_dim=12, n_kv_head=4, tie_embeddings=False),
    "tiny-vision": get_preset("tiny-vision"),
    "gpt4-vision": get_preset("gpt4-vision"),
}


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", list(SHAPES))
def test_vision_counts_equal_the_built_models_numel(name):
    cfg = SHAPES[name]
    with torch.device("meta"):
        model = Transformer(cfg)
    c = count_params(cfg)
    total = numel(model)
    assert c.total == total
    assert c.vision_encoder == numel(model.vision.encoder)
    assert c.vision_resampler == numel(model.vision.resampler)
    assert c.vision_projector == numel(model.vision.proj)
    assert c.cross_attn == numel(model.xattn) and c.vision == numel(model.vision) + numel(model.xattn)
    assert sorted(int(k) for k in model.xattn) == cfg.cross_attn_layers and len(model.xattn) > 0
    kv = sum(numel(x.attn.wk) + numel(x.attn.wv) for x in model.xattn.values())
    assert c.per_image == numel(model.vision) + kv
    skipped = sum((m.n_expert - m.top_k) * sum(p[0].numel() for p in m.experts.parameters())
                  for m in model.moe_layers())
    assert c.active == total - skipped  # tests/test_counts.py's definition holds for vision configs too
    assert c.active_per_token == total - skipped - numel(model.vision) - kv
    # The text model is untouched: every text entry equals the text-only config's.
    text = count_params(cfg.replace(vision=None))
    assert c.text == text.total
    for key in ("embedding", "lm_head", "attention", "experts", "per_expert", "dense_mlp", "router", "norms"):
        assert getattr(c, key) == getattr(text, key), key


def test_explicit_layers_and_every_k():
    assert SHAPES["explicit_layers_mqa_tied"].cross_attn_layers == [1, 3]
    assert SHAPES["moe_gelu_every_2"].cross_attn_layers == [0, 2]
    assert get_preset("gpt4-vision").cross_attn_layers == list(range(0, 120, 7))  # 18 layers, Flamingo-80B's 7


@pytest.mark.parametrize("name", sorted(set(PRESETS) - {"gpt4-vision", "tiny-vision"}))
def test_text_only_counts_have_no_vision(name):
    cfg = get_preset(name)
    c = count_params(cfg)
    assert (c.vision_encoder, c.vision_resampler, c.vision_projector, c.cross_attn, c.per_image) == (0,) * 5
    assert c.active_per_token == c.active and c.text == c.total
    assert flops_per_token(cfg).cross_attention == 0 and vision_flops_per_image(cfg).total == 0
    assert encoder_cache_bytes(cfg) == 0


def flops(fn) -> int:
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ["moe_swiglu_every_1", "moe_gelu_every_2", "explicit_layers_mqa_tied",
                                  "untied_wide_heads"])
def test_flops_equal_torch_flop_counter(name):
    """Per image: the encoder, resampler and projector (`encode_images`) and each cross-attention layer's K/V of the
    visual tokens. Per text token that sees an image: the text model and the cross-attention layers' queries,
    scores over the L visual tokens, outputs and MLPs. counts puts 2 FLOPs on each norm weight and gate (the Kaplan
    convention, as tests/test_counts.py says), which the model multiplies elementwise."""
    cfg = SHAPES[name]
    torch.manual_seed(0)
    # Frozen weights: under no_grad, the resampler's `latents.expand` is a view that requires grad without a grad_fn,
    # which FlopCounterMode's module tracker cannot hook (torch/autograd/graph.py asserts).
    model = Transformer(cfg).eval().requires_grad_(False)
    v, B, T = cfg.vision, 2, 12
    pixels = torch.rand(B, v.channels, v.image_size, v.image_size) * 2 - 1
    idx = torch.randint(2, cfg.vocab_size, (B, T))
    idx[:, 0] = v.image_token_id  # every token sees its row's image
    per_image = vision_flops_per_image(cfg)
    f = flops_per_token(cfg, context=T)
    with torch.no_grad():
        visual = model.encode_images(pixels)
    assert flops(lambda: model.encode_images(pixels)) == B * (per_image.total - per_image.cross_kv)
    assert flops(lambda: model.cross_kv(visual)) == B * per_image.cross_kv
    vision = VisionInput(image_BT=image_index(idx, v.image_token_id), visual_ILD=visual)
    assert bool((vision.image_BT >= 0).all())
    c = count_params(cfg)
    elementwise = c.norms + sum(p.numel() for n, p in model.xattn.named_parameters() if "norm" in n or "gate" in n)
    # forward() projects each layer's K/V of all B images itself (training's path), so they are counted there too.
    got = flops(lambda: model(idx, vision=vision))
    assert f.cross_attention > 0
    assert got == B * T * (f.total - 2 * elementwise) + B * per_image.cross_kv


def test_encoder_cache_bytes_equal_the_models_kv():
    cfg = SHAPES["explicit_layers_mqa_tied"]
    model = Transformer(cfg).eval()
    v, images = cfg.vision, 3
    with torch.no_grad():
        kv = model.cross_kv(model.encode_images(torch.zeros(images, v.channels, v.image_size, v.image_size)))
    real = sum(t.numel() * t.element_size() for k, vv in kv.values() for t in (k, vv))
    assert sorted(kv) == cfg.cross_attn_layers
    assert encoder_cache_bytes(cfg, 4, images=images) == real  # fp32 model
    # gpt4-vision: 18 layers x K and V x 64 latents x 1 KV head (MQA) x 128 x 2 B (bf16)
    assert encoder_cache_bytes(get_preset("gpt4-vision"), 2) == 18 * 2 * 64 * 1 * 128 * 2 == 589_824


def test_gpt4_vision_is_gpt4_plus_published_vision_sizes():
    """The text model is the gpt4 preset's, parameter for parameter; the encoder is CLIP ViT-L/14 at 336 px
    (~304M in the CLIP paper's table, whose tower has no patch bias and a class token moekit's lacks)."""
    cfg, c, gpt4 = get_preset("gpt4-vision"), count_params(get_preset("gpt4-vision")), count_params(get_preset("gpt4"))
    assert c.text == gpt4.total and c.total == gpt4.total + c.vision
    assert c.vision_encoder == pytest.approx(304e6, rel=0.01)
    assert cfg.vision.n_patches == 576 and cfg.vision.n_latents == 64 and cfg.vision.resampler_layers == 6
    assert 0.01 < c.vision / c.text < 0.02  # 25.4B on top of 1.83T: mostly the 18 dense cross-attention layers
    assert c.cross_attn / c.vision > 0.95
    # An encoder pass is ~2 x its weights x patches plus the patch attention: ~0.4 TFLOP, under a text token's.
    f = vision_flops_per_image(cfg)
    assert f.encoder == pytest.approx(2 * c.vision_encoder * 576 + 24 * 4 * 576 ** 2 * 1024, rel=0.01)
    assert f.total < flops_per_token(cfg).matmul
    tv = get_preset("tiny-vision")
    assert (tv.vision.image_size, tv.vision.patch_size, tv.vision.d_model, tv.vision.n_layer, tv.vision.n_latents,
            tv.vision.cross_attn_every, tv.vision.image_token_id) == (32, 8, 128, 2, 16, 2, -1)
    assert count_params(tv).text == count_params(get_preset("tiny")).total


def test_info_prints_the_vision_side_only_for_vision_configs(capsys):
    assert main(["info", "gpt4-vision"]) == 0
    out = capsys.readouterr().out
    assert "vision: 336 px images, 576 patches of 14 px, 64 visual tokens each; 18 cross-attention layers" in out
    assert "25.41B" in out and "(1.39% of the text model's 1.83T" in out and "303.50M" in out
    assert "589.82kB" in out  # the encoder cache per image
    assert main(["info", "gpt4"]) == 0
    assert "vision" not in capsys.readouterr().out
    assert main(["info", "tiny-vision", "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    c = count_params(get_preset("tiny-vision"))
    assert card["vision"]["params"]["total"] == c.vision and card["params"]["active_per_token"] == c.active_per_token
    assert card["vision"]["flops_per_image"]["total"] == vision_flops_per_image(get_preset("tiny-vision")).total
    assert main(["info", "tiny", "--json"]) == 0
    assert "vision" not in json.loads(capsys.readouterr().out)
