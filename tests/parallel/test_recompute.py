"""Activation recomputation (`--recompute full|selective`, moekit/parallel/parallelize.py) changes memory, never
the numbers: the same loss, gradients and routing as keeping every activation (fp64, one process)."""

import pytest
import torch
from conftest import tiny_cfg

from moekit.model.transformer import Transformer
from moekit.parallel.parallelize import RECOMPUTE, Layout, apply_recompute, parallelize


def loss_and_grads(model, idx):
    model.zero_grad()
    out = model(idx[:, :-1], idx[:, 1:])
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_recomputation_gives_the_same_loss_gradients_and_routing(mode, mlp):
    cfg = tiny_cfg(mlp=mlp, moe_every=1)
    torch.manual_seed(0)
    ref = Transformer(cfg).double()
    ref.init_weights(0)
    model = Transformer(cfg).double()
    model.load_state_dict(ref.state_dict())
    apply_recompute(model, mode)
    idx = torch.randint(0, cfg.vocab_size, (3, 17))
    out_ref, g_ref = loss_and_grads(ref, idx)
    out, g = loss_and_grads(model, idx)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-12, atol=0)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-10, atol=1e-12, msg=name)
    for a, b in zip(out.routing, out_ref.routing, strict=True):
        assert torch.equal(a.tokens_per_expert_E, b.tokens_per_expert_E)
    assert set(dict(model.named_parameters())) == set(g_ref)  # the blocks keep their names (no wrapper)


@pytest.mark.parametrize("mode, attention_runs", [("none", 1), ("selective", 2), ("full", 2)])
def test_the_backward_recomputes_each_block(mode, attention_runs):
    """Recomputation reruns each block's forward in the backward (counted at its attention module)."""
    model = Transformer(tiny_cfg())
    if mode != "none":
        apply_recompute(model, mode)
    runs = []
    model.blocks["0"].attn.register_forward_hook(lambda *a: runs.append(1))
    idx = torch.randint(0, 97, (2, 9))
    model(idx[:, :-1], idx[:, 1:]).loss.backward()
    assert len(runs) == attention_runs


def test_parallelize_on_one_process_is_the_model_itself_and_refuses_bad_modes():
    model = Transformer(tiny_cfg())
    assert parallelize(model, Layout.single(torch.device("cpu"))) is model
    with pytest.raises(ValueError, match="--recompute 'some': choose one of none, selective, full"):
        parallelize(model, Layout.single(torch.device("cpu")), recompute="some")
    assert RECOMPUTE == ("none", "selective", "full")
