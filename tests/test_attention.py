"""Attention and the transformer forward: SDPA vs a naive oracle, KV-cache decoding vs full recompute."""

import pytest
import torch
from conftest import tiny_cfg

from moekit.model.attention import (
    Attention,
    ContiguousContext,
    KVCache,
    apply_rope,
    rope_cos_sin,
    rope_inv_freq,
)
from moekit.model.reference import attention_naive
from moekit.model.transformer import Transformer

# The tiny config, 48 wide with 6 heads (so that n_kv_head can be 1, 2, 3 or 6), MQA, a GELU MoE in both layers.
SHAPE = dict(d_model=48, n_head=6, n_kv_head=1, d_ff=64, moe_every=1, mlp="gelu", max_seq_len=64)


def small_cfg(**kw):
    return tiny_cfg(**{**SHAPE, **kw})


@pytest.mark.parametrize("n_kv_head", [1, 2, 6])  # MQA, GQA, MHA
def test_attention_equals_naive(n_kv_head):
    cfg = small_cfg(n_kv_head=n_kv_head)
    torch.manual_seed(0)
    attn = Attention(cfg).double()
    x = torch.randn(2, 9, 48, dtype=torch.float64)
    cos, sin = rope_cos_sin(rope_inv_freq(cfg), torch.arange(9).expand(2, 9))
    q, k, v = attn.qkv(x, cos, sin)
    expected = attn.wo(attention_naive(q, k, v).transpose(1, 2).reshape(2, 9, 48))
    torch.testing.assert_close(attn(x, cos, sin), expected, rtol=1e-10, atol=1e-10)


def test_rope_is_relative():
    """<R(m) q, R(n) k> depends only on m - n (Su et al. 2021, eq. 11)."""
    cfg = small_cfg(head_dim=16, n_head=3)
    inv = rope_inv_freq(cfg).double()
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def dot(m, n):
        cm, sm = rope_cos_sin(inv, torch.tensor([[m]]))
        cn, sn = rope_cos_sin(inv, torch.tensor([[n]]))
        return (apply_rope(q, cm.double(), sm.double()) * apply_rope(k, cn.double(), sn.double())).sum()

    assert dot(5, 2).item() == pytest.approx(dot(13, 10).item(), rel=1e-5)
    assert dot(5, 2).item() != pytest.approx(dot(5, 3).item(), rel=1e-3)


def test_linear_rope_scaling_interpolates_positions():
    cfg = small_cfg(rope_scaling={"rope_type": "linear", "factor": 4.0})
    plain = small_cfg()
    c1, s1 = rope_cos_sin(rope_inv_freq(cfg), torch.tensor([[8]]))
    c2, s2 = rope_cos_sin(rope_inv_freq(plain), torch.tensor([[2]]))
    torch.testing.assert_close(c1, c2)
    torch.testing.assert_close(s1, s2)


@pytest.mark.parametrize("n_kv_head", [1, 3])
def test_kv_cache_decode_equals_full_forward(n_kv_head):
    torch.manual_seed(0)
    model = Transformer(small_cfg(n_kv_head=n_kv_head)).double().eval()
    idx = torch.randint(0, 97, (2, 20))
    full = model(idx).logits
    cache = model.new_cache(batch=2, max_len=32)
    # A prefill chunk, a second chunk, then one token at a time.
    parts = [model(idx[:, :7], ctx=ContiguousContext(cache, 0)).logits,
             model(idx[:, 7:12], ctx=ContiguousContext(cache, 7)).logits]
    for t in range(12, 20):
        parts.append(model(idx[:, t:t + 1], ctx=ContiguousContext(cache, t)).logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-10, atol=1e-10)


def test_kv_cache_refuses_overflow():
    cache = KVCache(1, 4, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="holds 4 tokens"):
        cache.update(3, torch.zeros(1, 1, 2, 8), torch.zeros(1, 1, 2, 8))


def test_causality_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = Transformer(small_cfg()).double().eval()
    a = torch.randint(0, 97, (1, 12))
    b = a.clone()
    b[0, 8:] = (b[0, 8:] + 1) % 97
    torch.testing.assert_close(model(a).logits[:, :8], model(b).logits[:, :8])


def test_loss_includes_router_losses_and_backpropagates():
    torch.manual_seed(0)
    cfg = small_cfg(aux_loss_coef=0.1, z_loss_coef=0.01)
    model = Transformer(cfg)
    idx = torch.randint(0, 97, (2, 16))
    out = model(idx, idx)
    assert len(out.routing) == 2
    # The language-model term is the cross-entropy of the returned logits, computed here on its own.
    torch.testing.assert_close(out.ce_loss, torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), idx.flatten()))
    expected = out.ce_loss + 0.1 * out.aux_loss + 0.01 * out.z_loss
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.blocks["0"].mlp.router.weight.grad.abs().sum() > 0


def test_moe_every_makes_mixed_dense_and_sparse_layers():
    model = Transformer(small_cfg(n_layer=4, moe_every=2, dense_d_ff=80))
    kinds = [type(b.mlp).__name__ for b in model.blocks.values()]
    assert kinds == ["MLP", "MoE", "MLP", "MoE"]
    assert model.blocks["0"].mlp.w1.weight.shape == (80, 48)


def test_bf16_autocast_forward_runs_and_is_close():
    torch.manual_seed(0)
    model = Transformer(small_cfg()).eval()
    idx = torch.randint(0, 97, (2, 16))
    ref = model(idx).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(idx).logits
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
