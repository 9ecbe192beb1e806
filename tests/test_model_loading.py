"""The one weight-loading path, `Transformer.from_tensors` / `load_tensors`: round trips, clear errors, and
runs saved before the Experts module (expert weights `blocks.{i}.mlp.w1` stored (E, D, F)) still load."""

import pytest
import torch
from conftest import tiny_cfg

from moekit.model.transformer import Transformer, upgrade_state_dict
from moekit.train.checkpoint import CheckpointError, load_model_tensors, load_optimizer_tensors, optimizer_tensors

# The tiny config (a dense and a SwiGLU MoE layer) at 16 wide, 2 heads of 8 with one KV head, 61 tokens, tied.
CFG = tiny_cfg(vocab_size=61, d_model=16, n_head=2, n_kv_head=1, d_ff=24, max_seq_len=32, tie_embeddings=True)


def model(seed: int = 0) -> Transformer:
    m = Transformer(CFG).eval()
    m.init_weights(seed)
    return m


def legacy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict as moekit wrote it before the Experts module: `mlp.w1` (E, D, F), `mlp.w2` (E, F, D)."""
    out = {}
    for name, t in tensors.items():
        if ".mlp.experts." in name:
            name, t = name.replace(".mlp.experts.", ".mlp."), t.transpose(1, 2).contiguous()
        out[name] = t
    return out


def stored(m: Transformer) -> dict[str, torch.Tensor]:  # as a run's model.safetensors: tied tensors once
    return {k: v.clone() for k, v in m.state_dict().items() if k != "lm_head.weight"}


def test_from_tensors_round_trip_and_the_legacy_layout_give_the_same_model():
    src = model()
    idx = torch.randint(0, 61, (2, 11))
    with torch.no_grad():
        ref = src(idx).logits
        for tensors in (stored(src), legacy(stored(src))):
            loaded = Transformer.from_tensors(CFG, tensors).eval()
            assert loaded.lm_head.weight is loaded.tok_emb.weight  # tied again
            assert all(not p.is_meta for p in loaded.parameters())
            assert torch.equal(loaded(idx).logits, ref)
            w1 = loaded.moe_layers()[0].experts.w1
            assert w1.shape == (4, 24, 16) and w1.is_contiguous()  # (E, out, in)


def test_load_tensors_names_what_does_not_match():
    good = stored(model())
    missing = {k: v for k, v in good.items() if k != "norm.weight"}
    with pytest.raises(ValueError, match=r"ckpt.safetensors does not match.*missing \['norm.weight'\]"):
        Transformer.from_tensors(CFG, missing, source="ckpt.safetensors")
    extra = {**good, "blocks.9.attn.wq.weight": torch.zeros(16, 16)}
    with pytest.raises(ValueError, match=r"unexpected \['blocks.9.attn.wq.weight'\]"):
        Transformer.from_tensors(CFG, extra)
    bad = {**good, "blocks.0.attn.wq.weight": torch.zeros(16, 8)}
    with pytest.raises(ValueError, match=r"blocks.0.attn.wq.weight has shape \(16, 8\), the configuration "
                                         r"implies \(16, 16\)"):
        Transformer.from_tensors(CFG, bad)


def test_a_checkpoint_saved_before_the_experts_module_resumes_model_and_optimizer():
    """A training checkpoint in the old layout: weights and AdamW moments are renamed and transposed;
    the scalar `::step` is only renamed. After loading, one more step matches the never-saved run."""
    src = model(1)
    opt = torch.optim.AdamW(src.parameters(), lr=1e-2)
    idx = torch.randint(0, 61, (2, 9))
    for _ in range(2):
        opt.zero_grad()
        src(idx[:, :-1], idx[:, 1:]).loss.backward()
        opt.step()
    # Cloned, as a file would hold them: the live moments (and `step`) must not be shared by two optimizers.
    weights = legacy(stored(src))
    moments = {k: v.clone() for k, v in optimizer_tensors(src, opt).items()}
    old_moments = {}
    for key, t in moments.items():
        name, _, state = key.partition("::")
        if ".mlp.experts." in name:
            name, t = name.replace(".mlp.experts.", ".mlp."), (t.transpose(1, 2) if t.dim() == 3 else t)
        old_moments[f"{name}::{state}"] = t
    assert "blocks.1.mlp.w1::exp_avg" in old_moments and "blocks.1.mlp.w1::step" in old_moments
    assert set(upgrade_state_dict(old_moments)) == set(moments)

    dst = model(2)
    dst_opt = torch.optim.AdamW(dst.parameters(), lr=1e-2)
    load_model_tensors(dst, weights, "old/model.safetensors")
    load_optimizer_tensors(dst, dst_opt, old_moments, "old/optimizer.safetensors")
    for m, o in ((src, opt), (dst, dst_opt)):
        o.zero_grad()
        m(idx[:, :-1], idx[:, 1:]).loss.backward()
        o.step()
    for (name, a), (_, b) in zip(src.named_parameters(), dst.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_a_checkpoint_of_another_configuration_is_a_checkpoint_error():
    other = Transformer(CFG.replace(d_ff=32))
    with pytest.raises(CheckpointError, match=r"step_5/model.safetensors: blocks.0.mlp.w1.weight has shape \(32, 16\)"):
        load_model_tensors(model(), stored(other), "step_5/model.safetensors")
