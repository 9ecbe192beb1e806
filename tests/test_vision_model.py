"""The vision side of the model (moekit/model/vision.py): gates at 0 leave the text model bit for bit,
the cross-attention equals a loop oracle, Flamingo's masking, and the gradient trap of closed gates."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_cfg

from moekit.config import ModelConfig, VisionConfig
from moekit.model.reference import gated_cross_attention_loop
from moekit.model.transformer import Transformer
from moekit.model.vision import VisionInput, image_index

MARK = 5
VISION = dict(image_size=16, patch_size=4, d_model=32, n_head=4, d_ff=64, n_latents=6, image_token_id=MARK)


def vision_cfg(**overrides) -> ModelConfig:
    return tiny_cfg(vision={**VISION, **overrides.pop("vision", {})}, **overrides)


def models(seed=0, **overrides) -> tuple[Transformer, Transformer]:
    """A text model and the vision model made from its weights (the stage-2 starting point)."""
    cfg = vision_cfg(**overrides)
    text = Transformer(cfg.replace(vision=None)).eval()
    text.init_weights(seed)
    vis = Transformer(cfg).eval()
    vis.init_weights(seed + 1)
    vis.load_state_dict(text.state_dict(), strict=False)
    return text, vis


def open_gates(model: Transformer, value: float = 0.7) -> None:
    with torch.no_grad():
        for layer in model.xattn.values():
            layer.attn_gate.fill_(value)
            layer.mlp_gate.fill_(-value)


def batch(seed=0, B=2, T=24, n_img=(1, 2)):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(6, 97, (B, T), generator=g)
    for b, n in enumerate(n_img):
        for j in range(n):
            idx[b, 4 + 9 * j + b] = MARK
    pixels = torch.rand(sum(n_img), 3, 16, 16, generator=g) * 2 - 1
    return idx, pixels


def run(model, idx, pixels):
    vis = VisionInput(image_index(idx, MARK), visual_ILD=model.encode_images(pixels))
    return model(idx, vision=vis).logits


@pytest.mark.parametrize("every", [1, 2])
def test_closed_gates_leave_the_text_model_bitwise(every):
    text, vis = models(vision={"cross_attn_every": every})
    idx, pixels = batch()
    with torch.no_grad():
        assert torch.equal(run(vis, idx, pixels), text(idx).logits)
        assert torch.equal(vis(idx).logits, text(idx).logits)  # no images at all: the xattn layers are skipped


def test_rows_without_an_image_are_the_text_model_even_with_open_gates():
    text, vis = models()
    open_gates(vis)
    idx, pixels = batch(n_img=(0, 2))
    with torch.no_grad():
        out, ref = run(vis, idx, pixels), text(idx).logits
        assert torch.equal(out[0], ref[0])  # (same batch shape as the reference: same kernels, same bits)
        assert not torch.allclose(out[1], ref[1])


def test_cross_attention_equals_the_loop_oracle_fp64():
    _, vis = models(n_head=4, n_kv_head=1)  # MQA, GPT-4's attention
    vis = vis.double()
    open_gates(vis, 0.9)
    layer = vis.xattn["0"]
    idx, pixels = batch(seed=3)
    image_BT = image_index(idx, MARK)
    visual = vis.encode_images(pixels.double())
    x_BTD = torch.randn(*idx.shape, vis.cfg.d_model, dtype=torch.float64)
    with torch.no_grad():
        fast = layer(x_BTD, VisionInput(image_BT, visual_ILD=visual))
        slow = gated_cross_attention_loop(layer, x_BTD, image_BT, visual)
        kv = VisionInput(image_BT, kv={0: layer.kv(visual)})  # the engine's form: K/V precomputed
        cached = layer(x_BTD, kv)
    assert (fast - slow).abs().max() < 1e-10
    assert torch.equal(fast, cached)
    assert (fast - x_BTD).abs().max() > 1e-3  # the layer did something


def test_text_before_an_image_does_not_see_it():
    _, vis = models()
    open_gates(vis)
    idx, pixels = batch(n_img=(1, 1))
    other = pixels.clone()
    other[0] = -other[0]
    with torch.no_grad():
        a, b = run(vis, idx, pixels), run(vis, idx, other)
    first = int((idx[0] == MARK).nonzero()[0])
    assert torch.equal(a[0, :first], b[0, :first])  # before row 0's marker: identical
    assert (a[0, first:] - b[0, first:]).abs().amax(-1).min() > 0  # at and after it: every token changes
    assert torch.equal(a[1], b[1])  # row 1 has its own image


def test_image_index_is_the_most_recent_marker():
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 8, (4, 30), generator=g)
    got = image_index(idx, MARK)
    n = 0
    for b in range(4):
        cur = -1
        for t in range(30):
            if idx[b, t] == MARK:
                cur, n = n, n + 1
            assert got[b, t] == cur
    assert n == int((idx == MARK).sum())


def test_closed_gates_block_gradients_until_they_open():
    """Flamingo's gates at 0: only the gates get a gradient at first (a loss on every token moves them)."""
    _, vis = models()
    vis.train()
    idx, pixels = batch()
    loss = Transformer.forward(vis, idx, idx, vision=VisionInput(image_index(idx, MARK),
                                                                 visual_ILD=vis.encode_images(pixels))).loss
    loss.backward()
    layer = vis.xattn["0"]
    assert layer.attn_gate.grad.abs().item() > 0 and layer.mlp_gate.grad.abs().item() > 0
    assert layer.attn.wq.weight.grad.abs().max() == 0
    assert vis.vision.encoder.patch.weight.grad.abs().max() == 0
    open_gates(vis, 0.1)
    vis.zero_grad()
    Transformer.forward(vis, idx, idx, vision=VisionInput(image_index(idx, MARK),
                                                          visual_ILD=vis.encode_images(pixels))).loss.backward()
    assert layer.attn.wq.weight.grad.abs().max() > 0
    assert vis.vision.encoder.patch.weight.grad.abs().max() > 0


def test_a_seed_draws_the_same_text_weights_with_or_without_vision():
    cfg = vision_cfg()
    a, b = Transformer(cfg), Transformer(cfg.replace(vision=None))
    a.init_weights(7)
    b.init_weights(7)
    sa = a.state_dict()
    assert all(torch.equal(t, sa[k]) for k, t in b.state_dict().items())
    assert all(layer.attn_gate.item() == 0 == layer.mlp_gate.item() for layer in a.xattn.values())


def test_vision_config_round_trips_and_checks():
    cfg = vision_cfg(vision={"cross_attn_every": 2}, n_layer=4)
    assert cfg.cross_attn_layers == [0, 2]
    back = ModelConfig.from_dict(cfg.to_dict())
    assert back == cfg and isinstance(back.vision, VisionConfig)
    assert cfg.replace(n_layer=6).cross_attn_layers == [0, 2, 4]
    assert vision_cfg(vision={"cross_attn_layers": [1, 3]}, n_layer=4).cross_attn_layers == [1, 3]
    with pytest.raises(ValueError, match="cross_attn_layers"):
        vision_cfg(vision={"cross_attn_layers": [5]}, n_layer=4)
    with pytest.raises(ValueError, match="unknown vision field"):
        vision_cfg(vision={"n_latent": 4})
    with pytest.raises(ValueError, match="patch_size"):
        vision_cfg(vision={"patch_size": 5})
    with pytest.raises(ValueError, match="image_token_id"):
        vision_cfg(vision={"image_token_id": 97})
    with pytest.raises(ValueError, match="no vision encoder"):
        Transformer(tiny_cfg()).encode_images(torch.zeros(1, 3, 16, 16))
