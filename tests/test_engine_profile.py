"""moekit/engine_profile.py: the bytes its decode pass reads, and the overheads it solves for, against oracles."""

import pytest
import torch

from moekit import engine_profile as ep
from moekit.config import ModelConfig
from moekit.plan.stage_step import expert_coverage

CFG = ModelConfig(name="probe", vocab_size=512, n_layer=3, d_model=64, n_head=4, head_dim=16, n_kv_head=1, d_ff=96,
                  n_expert=8, top_k=2, mlp="swiglu", max_seq_len=64)


def linear_bytes(i: int, o: int, b: int) -> int:
    return i * o * b


@pytest.mark.parametrize("dtype, b", [("fp32", 4), ("bf16", 2)])
def test_a_batch1_pass_reads_the_attention_the_router_top_k_experts_and_the_lm_head(dtype, b):
    """One token routes to exactly top_k distinct experts in every layer: the bytes, from the config alone."""
    _, nbytes = ep.decode_pass(ep.build(CFG, dtype, torch.device("cpu")), batch=1)
    d, q, kv, f = CFG.d_model, CFG.q_dim, CFG.kv_dim, CFG.d_ff
    attention = linear_bytes(d, q, b) + 2 * linear_bytes(d, kv, b) + linear_bytes(q, d, b)
    expert = 3 * d * f * b  # SwiGLU: gate, up, down
    router = linear_bytes(d, CFG.n_expert, b)
    want = CFG.n_layer * (attention + router + CFG.top_k * expert) + linear_bytes(d, CFG.vocab_size, b)
    assert nbytes == want


def test_int8_counts_its_int8_weights_and_their_scales():
    _, int8 = ep.decode_pass(ep.build(CFG, "int8", torch.device("cpu")), batch=1)
    _, fp32 = ep.decode_pass(ep.build(CFG, "fp32", torch.device("cpu")), batch=1)
    assert fp32 / 4 < int8 < fp32 / 3.5  # a byte per weight, plus an fp32 scale per output channel (the router stays)


def test_more_tokens_read_more_experts_and_only_those():
    model = ep.build(CFG, "fp32", torch.device("cpu"))
    _, one = ep.decode_pass(model, batch=1)
    _, many = ep.decode_pass(model, batch=16)
    expert = 3 * CFG.d_model * CFG.d_ff * 4
    extra = (many - one) / expert / CFG.n_layer  # experts per layer beyond top_k, averaged over the passes
    assert 0 < extra <= CFG.n_expert - CFG.top_k


def test_the_overheads_are_solved_exactly_from_the_four_step_times(monkeypatch):
    """Step times made from known overheads with the planner's expert coverage give those overheads back."""
    cfg = CFG.replace(n_layer=8, moe_every=2)  # 4 MoE layers of 8: the coverage counts per layer on average
    true = ep.EngineOverheads(layer_us=500.0, step_us=900.0, expert_us=60.0, seq_us=40.0)

    def fake(c, weight_dtype, dev, batch, steps):
        experts = expert_coverage(c.n_expert, c.top_k, batch) * c.n_moe_layers
        us = true.step_us + batch * true.seq_us + c.n_layer * true.layer_us + experts * true.expert_us
        return us * 1e-6

    monkeypatch.setattr(ep, "_decode_step_s", fake)
    got = ep.engine_overheads(cfg, "fp32", torch.device("cpu"))
    for k, v in true.to_dict().items():
        assert got.to_dict()[k] == pytest.approx(v, rel=1e-9), k


def test_the_narrow_copy_keeps_the_structure_and_multiples_of_16():
    n = ep.narrow(CFG.replace(d_model=512, d_ff=2048, head_dim=64, vocab_size=8192))
    assert (n.n_layer, n.n_expert, n.top_k, n.n_head, n.n_kv_head, n.mlp) == (3, 8, 2, 4, 1, "swiglu")
    assert (n.d_model, n.d_ff, n.head_dim, n.vocab_size) == (64, 256, 16, 1024)
    assert all(x % 16 == 0 for x in (n.d_model, n.d_ff, n.dense_d_ff, n.head_dim))


def test_an_engine_step_is_timed_with_every_sequence_still_decoding():
    """The windows stop before any sequence reaches max_tokens (a finished one would leave an emptier step);
    _decode_step_s asserts it, so this fails if the window arithmetic drifts from the requests' lengths."""
    assert ep._decode_step_s(CFG, "fp32", torch.device("cpu"), batch=3, steps=4) > 0
