"""The planner's vision side (moekit/plan/vision.py, SPEC section 5): gpt4-vision's figures, the article's IO claim
as a checked claim of the report, the report and the train/serve plans mentioning vision only for vision configs,
the pipeline layout and per-rank parameter list of vision models, and `moekit plan --model gpt4-vision` /
`moekit plan vision` on the command line.

Oracles: moekit.counts (itself held to the built model and torch's FLOP counter by tests/test_vision_counts.py),
the training planner's FLOPs for the text pre-training, hand arithmetic for the IO and cache bytes, and
`Transformer(cfg).named_parameters()` on the meta device for the parameter list.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_cfg

from moekit.cli import main
from moekit.config import VisionConfig
from moekit.counts import count_params, flops_per_token, vision_flops_per_image
from moekit.model.transformer import Transformer
from moekit.plan import format_report, gpt4_report, serve, stages, train
from moekit.plan.shards import beside, params, stage_params
from moekit.plan.vision import vision_plan
from moekit.presets import get_preset


@pytest.fixture(autouse=True)
def _no_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_gpt4_vision_figures():
    cfg = get_preset("gpt4-vision")
    p = vision_plan(cfg)
    c, gpt4 = count_params(cfg), count_params(get_preset("gpt4"))
    # Parameters: on top of gpt4's 1.83T, unchanged; 1.39% more.
    assert p.params.text == gpt4.total and p.params.total == c.vision == c.total - gpt4.total
    assert p.params.share == pytest.approx(0.0139, abs=5e-4) and p.params.n_cross_layers == 18
    assert p.params.text_active_per_token == gpt4.active < p.params.active_per_token
    # FLOPs per image: what counts says, and less than one text token's 558 GFLOP.
    assert p.image_flops == vision_flops_per_image(cfg)
    assert p.image_flops.total == pytest.approx(414e9, rel=0.01) and p.image_in_text_tokens < 1
    # Encoder cache: 18 layers x K, V x 64 latents x 1 KV head x 128 x 2 B per image, 8 images per request.
    assert p.cache.per_image == 589_824 and p.cache.per_request == 8 * 589_824
    assert p.cache.text_kv_per_token == 61_440 and p.cache.text_kv_window == 61_440 * 8192
    # Fine-tune: 3 x forward per text token x 2T + 3 x FLOPs per image x 2T x 5 / 256 images.
    f = flops_per_token(cfg)
    ft = p.finetune
    assert ft.images == pytest.approx(2e12 * 5 / 256)
    assert ft.flops == pytest.approx(3 * (f.matmul + f.cross_attention) * 2e12 + 3 * p.image_flops.total * ft.images)
    pre = train(get_preset("gpt4"), "A100-80GB", 25_000, 13e12, mfu=0.34)
    assert ft.pretrain_flops == pytest.approx(pre.flops, rel=1e-12)  # the training planner's 6 N D
    assert 0.15 < ft.share < 0.2  # 2T / 13T = 15%, plus the cross-attention and the encoder
    assert ft.days == pytest.approx(ft.flops / (25_000 * 312e12 * 0.34) / 86_400, rel=1e-9)
    assert p.to_dict()["finetune"]["share"] == ft.share


def test_the_io_claim_is_checked():
    """SPEC 5: ~600 bytes per image token vs ~4 per text token, ~150x. A 14 x 14 RGB patch is 588 bytes: 147x."""
    io = vision_plan("gpt4-vision").io
    assert (io.patch_bytes, io.text_bytes_per_token, io.ratio) == (14 * 14 * 3, 4, 147)
    assert io.agrees and io.per_visual_token == 336 * 336 * 3 / 64
    # The check can fail: 8 x 8 patches are 192 bytes (48x); 3 bytes per text token would give 196x.
    assert not vision_plan("tiny-vision").io.agrees
    assert not vision_plan("gpt4-vision", text_bytes_per_token=3).io.agrees
    claims = [c for c in gpt4_report("gpt4-vision").claims if c.section == "5"]
    assert len(claims) == 4 and all(c.agrees and c.article and c.moekit and c.assumptions for c in claims)
    io_claim = claims[-1]
    assert "150x" in io_claim.claim and io_claim.value == 147 and "= 147x (-2%)" in io_claim.moekit
    tiny = [c for c in gpt4_report("tiny-vision").claims if c.section == "5"]
    assert not tiny[-1].agrees and "48x" in tiny[-1].moekit


def test_the_report_mentions_vision_only_for_vision_configs():
    plain = gpt4_report()
    assert {c.section for c in plain.claims} == {"1", "2", "3", "4"}
    assert "vision" not in format_report(plain).lower()
    with_vision = gpt4_report("gpt4-vision")
    assert with_vision.claims[:len(plain.claims)] == plain.claims
    text = format_report(with_vision)
    assert "5. Vision" in text and "DISAGREES" not in text and "28 of 28 claims agree" in text
    with pytest.raises(ValueError, match="has no vision side"):
        gpt4_report("gpt4")
    kw = dict(n_gpus=8, tokens=1e9, mfu=0.5, tp=1, pp=1, batch_tokens=8 * 256, seq_len=256)
    assert not any("vision" in n for n in train("tiny", "H100", **kw).notes)
    assert any("moekit plan vision" in n for n in train("tiny-vision", "H100", **kw).notes)
    assert not any("vision" in n for n in serve("tiny", "H100", tp=1, pp=1, batch=4).notes)
    assert any("moekit plan vision" in n for n in serve("tiny-vision", "H100", tp=1, pp=1, batch=4).notes)


VISION_CFGS = {
    "gpt4-vision": get_preset("gpt4-vision"),
    "tiny-vision": get_preset("tiny-vision"),
    "swiglu_untied_explicit": tiny_cfg(n_layer=4, tie_embeddings=False, vision=VisionConfig(
        image_size=16, patch_size=4, d_model=24, n_head=3, d_ff=40, n_latents=5, cross_attn_layers=[1, 2])),
    "dense_layernorm_bias": tiny_cfg(n_layer=3, n_expert=1, top_k=1, norm="layernorm", bias=True, mlp="gelu",
                                     vision=VisionConfig(image_size=16, patch_size=8, resampler_layers=2)),
}


@pytest.mark.parametrize("name", list(VISION_CFGS))
def test_vision_parameters_in_the_layout_and_the_rank_list(name):
    cfg = VISION_CFGS[name]
    with torch.device("meta"):
        model = Transformer(cfg)
    assert [(p.name, p.shape) for p in params(cfg)] == [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    c = count_params(cfg)
    encoder = c.vision_encoder + c.vision_resampler + c.vision_projector
    kv_layer = 2 * cfg.d_model * cfg.kv_dim
    for pp in (1, 2, 3):
        st = stages(cfg, pp)
        dup = c.embedding if cfg.tie_embeddings and pp > 1 else 0
        assert sum(s.params for s in st) == pytest.approx(c.total + dup, rel=1e-12)
        # Only the per-token part of the cross-attention layers is multiplied by every token.
        assert 2 * sum(s.matmul_active for s in st) == pytest.approx(flops_per_token(cfg).matmul, rel=1e-12)
        first = 0
        for s in st:  # the encoder on the first stage, each cross-attention layer's K/V with its block
            n_x = sum(first <= i < first + s.layers for i in cfg.cross_attn_layers)
            assert s.vision == pytest.approx(n_x * kv_layer + (encoder if s.index == 0 else 0))
            first += s.layers
        if pp > 1:
            held = [stage_params(cfg, pp, s) for s in range(pp)]
            assert sum(len(h) for h in held) == len(params(cfg)) + (1 if cfg.tie_embeddings else 0)
            for s, h in enumerate(held):
                blocks = {int(p.group) for p in h if p.group != "root"}
                assert all(beside(p) in blocks for p in h if beside(p) is not None)
                assert s == 0 or not any(p.name.startswith("vision.") for p in h)


def test_moekit_plan_vision_on_the_command_line(capsys):
    assert main(["plan", "--model", "gpt4-vision"]) == 0
    out = capsys.readouterr().out
    assert "5. Vision" in out and "= 147x (-2%)" in out and "28 of 28 claims agree" in out
    assert main(["plan", "--model", "gpt4-vision", "--json"]) == 0
    sections = [c["section"] for c in json.loads(capsys.readouterr().out)["claims"]]
    assert sections.count("5") == 4
    assert main(["plan", "vision"]) == 0  # gpt4-vision by default
    out = capsys.readouterr().out
    assert "image 588 B" in out and "147x (article ~150x: agrees)" in out and "590 kB per image" in out
    assert main(["plan", "vision", "--model", "tiny-vision", "--tokens", "1B", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["finetune"]["tokens"] == 1e9 and d["io"]["agrees"] is False
    assert main(["plan", "vision", "--model", "gpt4-vision", "--n_layer=60", "--json"]) == 0  # overrides apply
    assert json.loads(capsys.readouterr().out)["params"]["n_cross_layers"] == len(range(0, 60, 7))
    for argv, message in ((["plan", "vision", "--model", "tiny"], "has no vision side"),
                          (["plan", "--model", "gpt4"], "has no vision side"),
                          (["plan", "--model", "gpt4-vision", "serve"], "give it after the command")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_moekit_plan_model_gpt4_vision_exits_0():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "moekit", "plan", "--model", "gpt4-vision"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "[28] Image data needs ~150x the IO of text" in proc.stdout and "(agrees)" in proc.stdout
