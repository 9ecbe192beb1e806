"""moekit/train_profile.py and the planner's use of a measured entry's training figures, against oracles."""

import pytest
import torch

from moekit import train_profile as tp
from moekit.config import ModelConfig
from moekit.plan.gemm import gemm_seconds
from moekit.plan.hardware import GPU
from moekit.plan.step_time import layer_gemms, step_time

CFG = ModelConfig(name="probe", vocab_size=256, n_layer=2, d_model=64, n_head=4, head_dim=16, n_kv_head=1, d_ff=128,
                  n_expert=4, top_k=2, mlp="gelu", max_seq_len=64)
CPU = torch.device("cpu")


def test_every_gemm_the_planner_asks_about_is_timed():
    """The forward shapes of both layer kinds and the lm_head, and both backward products of each, as step_time
    calls gemm_seconds: (m, k, n) for the input gradient, (k, n, m) for the weight gradient."""
    rates = tp.gemm_rates(CFG, 128, "fp32", CPU, repeats=1)
    want = set()
    for moe in (False, True):
        for m, n, k, _ in layer_gemms(CFG, moe, 128, 1, 1) + [(128, CFG.vocab_size, CFG.d_model, 1)]:
            want |= {tp.shape_key(m, n, k), tp.shape_key(m, k, n), tp.shape_key(k, n, m)}
    assert set(rates) == want and all(v > 0 for v in rates.values())


def test_attention_and_elementwise_rates_are_positive_rates():
    a = tp.attention_rates(CFG, 64, "fp32", CPU, batch=2, repeats=1)
    assert set(a) == {"fwd", "bwd"} and min(a.values()) > 0
    assert tp.elementwise_gb_s(CFG, 128, "fp32", CPU, repeats=1) > 0


def measured(**kw) -> GPU:
    return GPU(name="local", memory_gb=64, hbm_gb_s=1e4, tflops={"fp32": 1.0, "bf16": 0.1}, gpus_per_node=1,
               bandwidth_efficiency=1.0, flops_efficiency=1.0, **kw)


def test_a_measured_gemm_table_sets_each_shapes_rate_and_the_nearest_shape_stands_in():
    hw = measured(gemm_tflops_at={"fp32": {"4096,1024,512": 0.05, "512,2048,512": 0.02}})
    flops = 2 * 4096 * 1024 * 512
    assert gemm_seconds(4096, 1024, 512, hw, dtype="fp32") == pytest.approx(flops / 0.05e12)
    near = 2 * 500 * 2000 * 520
    assert gemm_seconds(500, 2000, 520, hw, dtype="fp32") == pytest.approx(near / 0.02e12)
    assert gemm_seconds(4096, 1024, 512, hw, dtype="bf16") == pytest.approx(flops / 0.1e12)  # no bf16 table: peak


def test_a_measured_entrys_step_is_its_measured_parts():
    """With every GEMM at 0.05 TFLOP/s (the stream so fast that none is memory-bound), attention at 0.02 forward /
    0.01 backward and memory-bound ops at 2 GB/s, the step's matmul and attention parts are exactly FLOPs / those
    rates, and the memory-bound part scales as 1 / the elementwise bandwidth."""
    t, s = 256, 64
    shapes = {}
    for moe in (False, True):
        for m, n, k, _ in layer_gemms(CFG, moe, t, 1, 1) + [(t, CFG.vocab_size, CFG.d_model, 1)]:
            for key in (tp.shape_key(m, n, k), tp.shape_key(m, k, n), tp.shape_key(k, n, m)):
                shapes[key] = 0.05
    hw = measured(gemm_tflops_at={"fp32": shapes}, attention_tflops={"fp32": {"fwd": 0.02, "bwd": 0.01}},
                  elementwise_gb_s=2.0)
    kw = dict(tp=1, pp=1, dp=1, micro_batches=1, micro_batch=t // s, seq_len=s, recompute="none", dtype="fp32")
    st = step_time(CFG, hw, **kw)
    gemm_flops = 0.0
    for i in range(CFG.n_layer):
        gemm_flops += sum(6 * m * n * k * c for m, n, k, c in layer_gemms(CFG, CFG.is_moe_layer(i), t, 1, 1))
    gemm_flops += 6 * t * CFG.vocab_size * CFG.d_model
    assert st.parts["matmul"] == pytest.approx(gemm_flops / 0.05e12)
    attn = CFG.n_layer * 2 * (t // s) * s * s * CFG.n_head * CFG.head_dim
    assert st.parts["attention"] == pytest.approx(attn / 0.02e12 + 2.5 * attn / 0.01e12)
    faster = step_time(CFG, hw.replace(elementwise_gb_s=4.0), **kw)
    assert faster.parts["memory_bound"] == pytest.approx(st.parts["memory_bound"] / 2)
