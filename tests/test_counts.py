"""Analytic counts: equal to the built model's numel() for every preset; FLOPs equal to torch's FLOP counter
over a real forward pass; gpt4 inside SPEC's tolerances."""

import pytest
import torch
from conftest import tiny_cfg
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from moekit.counts import count_params, flops_per_token, kv_bytes_per_token
from moekit.model.moe import MoE
from moekit.model.transformer import Transformer
from moekit.presets import PRESETS, get_preset


def built_counts(cfg):
    with torch.device("meta"):
        model = Transformer(cfg)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    expert = sum(p.numel() for m in model.moe_layers() for p in m.experts.parameters())
    attention = sum(p.numel() for b in model.blocks.values() for p in b.attn.parameters())
    return model, total, expert, attention


@pytest.mark.parametrize("name", list(PRESETS))
def test_counts_equal_numel(name):
    cfg = get_preset(name)
    model, total, expert, attention = built_counts(cfg)
    c = count_params(cfg)
    assert c.total == total
    assert c.experts == expert
    assert c.attention == attention
    assert c.embedding == model.tok_emb.weight.numel()
    # active = total minus the experts a token skips, counted from the modules themselves
    skipped = sum((m.n_expert - m.top_k) * sum(p[0].numel() for p in m.experts.parameters())
                  for m in model.moe_layers())
    assert c.active == total - skipped


@pytest.mark.parametrize("overrides", [dict(moe_every=2, dense_d_ff=100), dict(mlp="swiglu"),
                                       dict(n_expert=1, top_k=1, norm="layernorm", bias=True),
                                       dict(tie_embeddings=False, n_kv_head=2)])
def test_counts_equal_numel_for_variants(overrides):
    cfg = get_preset("tiny").replace(**overrides)
    _, total, expert, _ = built_counts(cfg)
    assert count_params(cfg).total == total
    assert count_params(cfg).experts == expert


def test_gpt4_counts_match_the_article():
    """SPEC section 2: ~1.8T total, ~280B active, ~111B per expert, ~55B attention, ~560 GFLOP/token."""
    cfg = get_preset("gpt4")
    c = count_params(cfg)
    assert c.total == pytest.approx(1.8e12, rel=0.03)
    assert c.active == pytest.approx(280e9, rel=0.03)
    assert c.per_expert == pytest.approx(111e9, rel=0.03)
    assert c.attention == pytest.approx(55e9, rel=0.05)
    f = flops_per_token(cfg)
    assert f.matmul == pytest.approx(560e9, rel=0.05)
    assert f.attention == 0  # reported separately, grows with context:
    f8k = flops_per_token(cfg, context=8192)
    assert f8k.attention == 4 * 120 * 8192 * cfg.n_head * cfg.head_dim
    assert (cfg.n_layer, cfg.n_expert, cfg.top_k, cfg.n_kv_head, cfg.max_seq_len) == (120, 16, 2, 1, 8192)
    assert cfg.vocab_size == 100_277
    # the 32k model is the 8k one, fine-tuned: same parameters
    assert count_params(get_preset("gpt4-32k")).total == c.total


def test_gpt4_builds_on_meta_without_memory():
    with torch.device("meta"):
        model = Transformer(get_preset("gpt4"))
    assert all(p.is_meta for p in model.parameters())
    assert isinstance(model.blocks["0"].mlp, MoE)


def test_other_presets_are_what_they_claim():
    assert count_params(get_preset("gpt3-175b")).total == pytest.approx(175e9, rel=0.01)
    assert count_params(get_preset("dense-1t")).total == pytest.approx(1e12, rel=0.03)
    mixtral = count_params(get_preset("mixtral-8x7b"))
    assert mixtral.total == pytest.approx(46.7e9, rel=0.01) and mixtral.active == pytest.approx(12.9e9, rel=0.01)
    mini = count_params(get_preset("gpt4-mini"))
    assert 250e6 <= mini.total <= 350e6 and 35e6 <= mini.active <= 50e6
    tiny = count_params(get_preset("tiny"))
    assert 1e6 <= tiny.total <= 10e6


def test_kv_bytes_per_token_mqa_vs_mha():
    cfg = get_preset("gpt4")
    # 2 (K and V) x 120 layers x 1 KV head x 128 x 2 bytes
    assert kv_bytes_per_token(cfg, 2) == 2 * 120 * 1 * 128 * 2 == 61_440
    assert kv_bytes_per_token(cfg, 2, n_kv_head=cfg.n_head) == 61_440 * 168


def test_flops_hand_worked_tiny_dense():
    cfg = tiny_cfg(vocab_size=10, n_layer=1, d_model=4, n_head=2, d_ff=8, n_expert=1, top_k=1, mlp="gelu",
                   max_seq_len=8)  # one dense GELU layer, 4 wide, 2 heads of 2 (both KV heads), 10 tokens
    # attention 4*4*4 = 64, MLP 2*4*8 = 64, norms 3*4 = 12, embedding 40, lm_head 40
    c = count_params(cfg)
    assert (c.attention, c.dense_mlp, c.norms, c.embedding, c.lm_head, c.total) == (64, 64, 12, 40, 40, 220)
    assert flops_per_token(cfg).matmul == 2 * (220 - 40)


@pytest.mark.parametrize("overrides", [
    dict(),  # the tiny config: a dense and a SwiGLU MoE layer, GQA
    dict(n_expert=1, top_k=1, tie_embeddings=True),  # dense, the embedding read by the lm_head
    dict(n_kv_head=4, mlp="gelu", moe_every=1, head_dim=12),  # MHA with a q width (48) unlike d_model
    dict(n_kv_head=1, n_layer=4, dense_d_ff=40, n_expert=8, top_k=1),  # MQA, dense layers of their own width
])
@pytest.mark.parametrize("dispatch", ["sorted", "gather"])
def test_flops_per_token_equal_torch_flop_counter(overrides, dispatch):
    """Oracle: torch's FLOP counter over a real forward pass of T tokens, with the math attention kernel
    (which it sees as matmuls over all T x T scores: `context` = T keys for every token, the convention of
    counts). counts puts 2 FLOPs on each norm weight as well (norms are in N by convention, Kaplan et al.
    2020), where the model multiplies them elementwise, and the embedding lookup is no matmul in either."""
    cfg = tiny_cfg(**overrides)
    model = Transformer(cfg).eval()
    for moe in model.moe_layers():
        moe.dispatch = dispatch
    T = 16
    idx = torch.randint(0, cfg.vocab_size, (1, T))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(idx)
    f = flops_per_token(cfg, context=T)
    assert f.attention > 0 and counter.get_total_flops() == T * (f.total - 2 * count_params(cfg).norms)
