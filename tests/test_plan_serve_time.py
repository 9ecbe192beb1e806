"""Issue 15, build point 2: serving time from its parts on datasheet GPUs (moekit/plan/serve_time.py), and measured
entries planned with their own figures. Each expectation names the published figure or mechanism it rests on."""

import math

import pytest

from moekit.config import ModelConfig
from moekit.plan import serve
from moekit.plan.hardware import GPU, get_gpu
from moekit.plan.serve import expert_coverage
from moekit.plan.serve_time import is_measured, load_serve_constants

# Llama-2 shapes (Touvron et al. 2023, Table 1 / the HF configs), as in calibration/serve.jsonl.
LLAMA7 = ModelConfig(name="llama2-7b", vocab_size=32000, n_layer=32, d_model=4096, n_head=32, n_kv_head=32,
                     d_ff=11008, mlp="swiglu", max_seq_len=4096)
LLAMA70 = ModelConfig(name="llama2-70b", vocab_size=32000, n_layer=80, d_model=8192, n_head=64, n_kv_head=8,
                      d_ff=28672, mlp="swiglu", max_seq_len=4096)


@pytest.fixture(autouse=True)
def _no_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))


def _decode(model, gpu, tp=1, batch=1, context=105, **kw):
    return serve(model, gpu, n_gpus=tp, tp=tp, pp=1, batch=batch, context=context, prompt_len=5, **kw)


def test_batch_1_decode_on_a_datasheet_gpu_has_a_floor():
    """Without floors the roofline made a 7B model's batch-1 decode weight reads alone. Published batch-1 figures
    stay well under the bandwidth bound: gpt-fast's Llama-2-7B at 104.9 tokens/s on an A100-80GB (README), 55% of
    the 2,039 GB/s bound of 151 tokens/s."""
    k = load_serve_constants()
    h100 = _decode(LLAMA7, "H100")
    flat = _decode(LLAMA7, "H100", roofline=True)
    assert flat.decode.overhead_s == 0 and h100.decode.overhead_s >= 32 * k.launch_us * 1e-6 > 0
    weights = h100.decode.bytes  # bf16 weights and the cache, read once per token
    bound = 3.35e12 / weights  # 100% of the H100's HBM bandwidth, no floor at all
    assert h100.tokens_per_s_per_user < 0.8 * bound and h100.tokens_per_s_per_user < flat.tokens_per_s_per_user
    a100 = _decode(LLAMA7, "A100-80GB")
    assert a100.tokens_per_s_per_user == pytest.approx(104.9, rel=0.15)  # gpt-fast's published figure
    assert a100.tokens_per_s_per_user < 2.039e12 / weights


def test_tp8_speeds_up_batch_1_decode_sub_linearly():
    """gpt-fast README, 'Tensor Parallelism': Llama-2-7B on 1/2/4/8 A100s, 104.9 / 168.8 / 254.0 / 328.4 tokens/s:
    3.1x on 8 GPUs, as the per-layer floor and the all-reduce latency (growing with the TP degree) do not shrink."""
    speed = {tp: _decode(LLAMA7, "A100-80GB", tp=tp).tokens_per_s_per_user for tp in (1, 2, 4, 8)}
    assert speed[1] < speed[2] < speed[4] < speed[8]
    assert 2.0 < speed[8] / speed[1] < 5.0  # published 3.13x; the flat roofline said ~7x
    flat = {tp: _decode(LLAMA7, "A100-80GB", tp=tp, roofline=True).tokens_per_s_per_user for tp in (1, 8)}
    assert flat[8] / flat[1] > speed[8] / speed[1]
    k = load_serve_constants()
    assert k.allreduce_s(8) > k.allreduce_s(2) > k.allreduce_s(1) == 0  # latency grows with the degree


def test_fp8_gains_less_than_2x():
    """TensorRT-LLM's H100vsA100 blog (docs/source/blogs/H100vsA100.md): FP8 W8A8 halves the bytes and doubles the
    peak, yet real kernels quantize, scale and dequantize around every GEMM; the fit's `fp8` factor is < 1, so
    neither batched prefill nor large-batch decode gets 2x."""
    kw = dict(n_gpus=4, tp=4, pp=1, batch=32, context=2048, prompt_len=2048)
    bf16 = serve(LLAMA70, "H100", **kw)
    fp8 = serve(LLAMA70, "H100", weight_dtype="fp8", kv_dtype="fp8", **kw)
    assert fp8.compute_dtype == "fp8" and load_serve_constants().fp8 < 1
    assert 1 < fp8.input_tokens_per_s / bf16.input_tokens_per_s < 2
    assert 1 < fp8.tokens_per_s / bf16.tokens_per_s < 2


def test_weight_only_int8_and_int4_gemv_reach_less_bandwidth():
    """gpt-fast README: Llama-2-7B at 104.9 (bf16), 155.6 (int8) and 196.8 (int4) tokens/s: 1.5x and 1.9x, not 2x
    and 4x, as dequantizing GEMVs stream less of the bandwidth."""
    k = load_serve_constants()
    assert k.int4_gemv < 1 and k.int8_gemv < 1
    s = {d: _decode(LLAMA7, "A100-80GB", weight_dtype=d).tokens_per_s_per_user for d in ("bf16", "int8", "int4")}
    assert 1.2 < s["int8"] / s["bf16"] < 2 and s["int8"] < s["int4"] < 4 * s["bf16"] / 2


def test_batched_prefill_beats_one_prompt_at_a_time():
    """vLLM's max_num_batched_tokens: short prompts share a step, so the GEMMs see thousands of rows and run near
    the GEMM ceiling (gemm.py's wave model), where one 128-token prompt per step runs skinny GEMMs and pays every
    layer's floor for few tokens."""
    kw = dict(n_gpus=1, tp=1, pp=1, batch=8, context=256, prompt_len=128)
    alone = serve(LLAMA7, "H100", prefill_chunk=128, **kw)
    packed = serve(LLAMA7, "H100", prefill_chunk=8192, **kw)
    assert packed.input_tokens_per_s > 2 * alone.input_tokens_per_s
    assert packed.time_to_first_token == pytest.approx(alone.time_to_first_token)  # one prompt alone, either way


def test_moe_decode_at_larger_batch_pays_dispatch():
    """Mixtral (8 experts, top-2): batch 1 runs 2 experts per layer, batch 64 all 8 of them: each costs the fitted
    dispatch time (routing, permutation, one grouped-GEMM group per expert touched)."""
    k = load_serve_constants()
    one = serve("mixtral-8x7b", "H100", n_gpus=2, tp=2, pp=1, batch=1, context=1024, prompt_len=128)
    many = serve("mixtral-8x7b", "H100", n_gpus=2, tp=2, pp=1, batch=64, context=1024, prompt_len=128)
    extra = 32 * (expert_coverage(8, 2, 64) - expert_coverage(8, 2, 1)) * k.expert_us * 1e-6
    assert k.expert_us > 0 and many.decode.overhead_s - one.decode.overhead_s == pytest.approx(extra)


def _measured() -> GPU:
    """An entry written as `moekit bench hardware` writes it: achieved figures, efficiencies 1, measured overheads."""
    return GPU("local", memory_gb=64, hbm_gb_s=20.0, tflops={"fp32": 0.5, "bf16": 0.4}, gemv_gb_s={"fp32": 15.0,
               "bf16": 9.0, "int8": 6.0}, flops_efficiency=1.0, bandwidth_efficiency=1.0, layer_overhead_us=600.0,
               step_overhead_us=900.0, expert_overhead_us=40.0, seq_overhead_us=70.0,
               batched_gemv_gb_s={"fp32": {"16": 7.0}, "bf16": {"16": 5.0}, "int8": {"16": 4.0}},
               overhead_by_dtype={"int8": {"layer": 800.0, "step": 1000.0, "expert": 30.0, "seq": 90.0}})


def test_is_measured_tells_the_entries_apart():
    assert is_measured(_measured()) and not any(is_measured(get_gpu(n)) for n in ("A100-80GB", "H100", "MI300X"))


@pytest.mark.parametrize("batch", [4, 16])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_a_measured_entrys_decode_time_is_exactly_its_measured_parts(dtype, batch):
    """No datasheet floors and no fitted factors on a measured entry: the step is max(FLOPs / measured FLOP/s,
    weights / measured GEMV GB/s at the step's tokens + cache / measured stream GB/s) + layers x layer_overhead_us +
    MoE layers x experts touched x expert_overhead_us, and the token adds step_overhead_us + sequences x
    seq_overhead_us; the overheads of the weight format where the entry has them (int8 here)."""
    hw, ctx = _measured(), 300
    layer_us, step_us, expert_us, seq_us = (800, 1000, 30, 90) if dtype == "int8" else (600, 900, 40, 70)
    one, sixteen = hw.gemv_gb_s[dtype], hw.batched_gemv_gb_s[dtype]["16"]
    gb_s = {4: (one + sixteen) / 2, 16: sixteen}[batch]  # 4 tokens: halfway from 1 to 16 on a log scale
    cfg = get_preset_mini()
    p = serve(cfg, hw, n_gpus=1, tp=1, pp=1, batch=batch, context=ctx, prompt_len=ctx, weight_dtype=dtype,
              kv_dtype="fp32" if dtype == "fp32" else "bf16")
    from moekit.plan.layout import stages

    (st,) = stages(cfg, 1)
    wb = {"fp32": 4, "bf16": 2, "int8": 1}[dtype]
    kvb = 4 if dtype == "fp32" else 2
    touched = expert_coverage(cfg.n_expert, cfg.top_k, batch)
    lookup = batch * cfg.d_model if st.embedding else 0  # gpt4-mini ties its embeddings: no lookup on its own
    w = (st.lm_head + st.dense + st.moe_layers * touched * st.expert_layer + lookup) * wb
    kv = batch * (ctx + 1) * st.layers * 2 * cfg.n_kv_head * cfg.head_dim * kvb
    memory = w / (gb_s * 1e9) + kv / (hw.hbm_gb_s * 1e9)
    flops = (2 * batch * (st.lm_head + st.dense) + 2 * batch * cfg.top_k * st.moe_layers * st.expert_layer
             + batch * 4 * st.layers * (ctx + 0.5) * cfg.q_dim)
    compute = flops / hw.peak_flops(p.compute_dtype)
    step = max(compute, memory) + (st.layers * layer_us + st.moe_layers * touched * expert_us) * 1e-6
    assert p.decode.seconds == pytest.approx(step, rel=1e-12)
    assert p.token_seconds == pytest.approx(step + (step_us + batch * seq_us) * 1e-6, rel=1e-12)
    assert not math.isclose(p.token_seconds, serve(cfg, hw.replace(flops_efficiency=0.99), n_gpus=1, tp=1, pp=1,
                                                   batch=batch, context=ctx, prompt_len=ctx, weight_dtype=dtype,
                                                   kv_dtype=p.kv_dtype).token_seconds)


def get_preset_mini() -> ModelConfig:
    from moekit.presets import get_preset

    return get_preset("gpt4-mini")


def test_roofline_flag_on_the_command_line(capsys):
    """`--roofline` reproduces the article's arithmetic (report.py's serving claims use it); the default plans from
    the parts, which costs more: the floors are time the flat roofline leaves out."""
    import json

    from moekit.cli import main

    argv = ["plan", "serve", "--gpu", "A100-80GB", "--context", "6144", "--prompt-len", "4096", "--json"]
    assert main(argv + ["--roofline"]) == 0
    flat = json.loads(capsys.readouterr().out)
    assert main(argv) == 0
    parts = json.loads(capsys.readouterr().out)
    assert flat["decode"]["overhead_s"] == 0 < parts["decode"]["overhead_s"]
    assert parts["cost_per_1k_output"] > flat["cost_per_1k_output"]
