"""Issue 15, build point 1: training time from its parts (moekit/plan/step_time.py, moekit/plan/gemm.py).

Each test changes one thing of a run and checks that the predicted step moves the way, and by about as much, as
the study named beside it measured. The runs: GPT-3 175B as Korthikanti et al. 2022 trained it (8-way tensor x
8-way pipeline on A100s, 2k sequences), GPT-4's 8 x 15 layout (SPEC section 3), and MPT-style dense models under
FSDP on one 8-GPU node (llm-foundry's benchmark table). Constants: the committed fit (train_constants.json).
"""

import pytest

from moekit.config import ModelConfig
from moekit.plan import get_gpu, train
from moekit.plan.gemm import MAMF, gemm_efficiency, wave_efficiency
from moekit.plan.step_time import PARTS, StepConstants, load_constants, step_time


@pytest.fixture(autouse=True)
def _no_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))


GPT3 = ModelConfig(name="gpt3-175b", vocab_size=51200, n_layer=96, d_model=12288, n_head=96, n_kv_head=96,
                   d_ff=49152, mlp="gelu", norm="layernorm", bias=True, max_seq_len=2048, tie_embeddings=True)
# Korthikanti et al. 2022 Table 3: 64 A100s, tensor 8 x pipeline 8, batch 64, micro-batch 1, 3 stages per rank.
KORTHIKANTI = dict(gpu="A100-80GB", n_gpus=64, tokens=64 * 2048, tp=8, pp=8, batch_tokens=64 * 2048, seq_len=2048,
                   schedule="interleaved", stages_per_rank=3, attention="unfused", sequence_parallel=False)


def mpt(n_layer: int, d_model: int, n_head: int) -> ModelConfig:
    return ModelConfig(name="mpt", vocab_size=50368, n_layer=n_layer, d_model=d_model, n_head=n_head,
                       n_kv_head=n_head, d_ff=4 * d_model, mlp="gelu", norm="layernorm", max_seq_len=2048,
                       tie_embeddings=True)


def step(cfg=GPT3, **kw):
    return train(cfg, **{**KORTHIKANTI, **kw}).step


def test_parts_sum_to_the_step_and_mfu_is_an_output():
    p = train("gpt4", "A100-80GB", 25_000)
    assert p.mfu_source == "predicted" and p.step is not None
    assert sum(p.step.parts.values()) == pytest.approx(p.step.seconds, rel=1e-9)
    assert set(p.step.parts) == set(PARTS)
    # MFU = model FLOPs / (GPUs x peak x time), the time being steps x the predicted step.
    assert p.mfu == pytest.approx(p.flops / (p.n_gpus * p.peak_flops * p.seconds))
    assert 0.15 < p.mfu < 0.45  # where large dense and MoE runs land on A100s (calibration/train.jsonl)
    # --mfu keeps the article's arithmetic: no step model, the old 94.9 days (SPEC section 3).
    given = train("gpt4", "A100-80GB", 25_000, mfu=0.34)
    assert given.step is None and given.mfu_source == "given" and given.days == pytest.approx(94.9, abs=0.05)


def test_gpt4_lands_in_the_articles_range_only_with_an_interleaved_schedule():
    # SPEC section 3: 32-36% MFU on ~25,000 A100s. The article names pipeline bubbles among the causes of low MFU.
    plain = train("gpt4", "A100-80GB", 25_000)
    inter = train("gpt4", "A100-80GB", 25_000, schedule="interleaved")
    assert plain.mfu < 0.32 and 0.31 <= inter.mfu <= 0.37
    assert plain.step.shares()["bubble"] == pytest.approx(plain.bubble, abs=0.02)  # (15 - 1) / (36 + 15 - 1)


def test_schedules_shrink_the_bubble_and_the_step():
    # Narayanan et al. 2021 section 2.2: interleaving v stages per rank cuts the bubble by v; Qi et al. 2024 (ZB-V)
    # fills it with weight-gradient work. Same work otherwise, so the step shrinks by the bubble it loses.
    kw = dict(gpu="A100-80GB", n_gpus=25_000)
    one, two, zb = (train("gpt4", **kw, schedule=s) for s in ("1f1b", "interleaved", "zero-bubble"))
    assert one.step.seconds > two.step.seconds > zb.step.seconds
    assert one.step.parts["bubble"] > two.step.parts["bubble"] > zb.step.parts["bubble"] > 0
    # torch's ZB-V leaves the V's ramp-in idle: (p - 1) chunk forwards, t_f / 2 each (tests/parallel/
    # test_pipeline_bubble.py measured it), against Qi et al.'s ideal 0.
    assert zb.bubble == pytest.approx((14 / 3 / 2) / (36 + 14 / 3 / 2), rel=1e-6)
    assert two.bubble == pytest.approx(one.bubble * (14 / (2 * 36 + 14)) / (14 / 50), rel=1e-6)


def test_recomputation_costs_what_korthikanti_measured():
    # Korthikanti et al. 2022 (Table 4, GPT-3 175B per layer): full recomputation adds ~39% to a step, selective
    # (the attention core again) a few percent; with sequence parallelism selective is almost free.
    none, sel, full = (step(recompute=r).seconds for r in ("none", "selective", "full"))
    assert none < sel < full
    assert 0.01 < sel / none - 1 < 0.07
    assert 0.25 < full / none - 1 < 0.45
    assert step(recompute="selective", sequence_parallel=True).seconds < none  # SP pays for selective
    # With FlashAttention the selective policy recomputes the memory-bound ops: still a few percent.
    f_none, f_sel, f_full = (step(recompute=r, attention="flash").seconds for r in ("none", "selective", "full"))
    assert 0.01 < f_sel / f_none - 1 < 0.07 and f_full / f_none - 1 > 0.25


def test_more_tensor_parallelism_exposes_more_communication():
    # Narayanan et al. 2021 section 5.4 (takeaway 1): tensor parallelism up to the 8 GPUs of a server, then
    # pipeline; at a fixed model and GPU count more tensor parallelism means smaller GEMMs and more exposed
    # all-reduces, and across servers (tp 16 over InfiniBand) throughput collapses.
    cfg = ModelConfig(name="llama-13b", vocab_size=32000, n_layer=40, d_model=5120, n_head=40, n_kv_head=40,
                      d_ff=13824, mlp="swiglu", max_seq_len=4096)
    runs = {tp: train(cfg, "A100-80GB", 64, 100e9, tp=tp, pp=1, batch_tokens=256 * 4096, recompute="selective")
            for tp in (2, 4, 8)}
    assert runs[2].mfu > runs[4].mfu > runs[8].mfu
    assert runs[2].step.shares()["tp_comm"] < runs[4].step.shares()["tp_comm"] < runs[8].step.shares()["tp_comm"]
    inside, across = step(tp=8, pp=8), step(tp=16, pp=4)
    assert across.seconds > 2 * inside.seconds and across.shares()["tp_comm"] > 0.4


def test_h100_is_faster_but_its_mfu_is_not_higher_in_proportion():
    # llm-foundry's table: MPT-7B on 8 GPUs reaches 64% MFU on A100s and 46% on H100s, 2.3x the tokens/s for 3.2x
    # the peak: memory-bound work and communication do not speed up with the tensor cores.
    a100, h100 = (train("gpt4", gpu, 8192) for gpu in ("A100-80GB", "H100"))
    assert h100.seconds < a100.seconds / 1.5
    assert h100.mfu < a100.mfu
    cfg = mpt(32, 4096, 32)
    kw = dict(n_gpus=8, tokens=96 * 2048, tp=1, pp=1, zero_stage=3, batch_tokens=96 * 2048, seq_len=2048,
              micro_batch=6, recompute="none")
    a, h = train(cfg, "A100-80GB", **kw), train(cfg, "H100", **kw)
    assert 1.8 < a.seconds / h.seconds < 3.17 and h.mfu < a.mfu


def test_small_models_reach_a_lower_mfu_on_the_same_gpus():
    # llm-foundry on 8 H100s: MPT-760M 35% MFU, 1B 42%, 7B 46%: small GEMMs and the vocabulary's share.
    kw = dict(n_gpus=8, tp=1, pp=1, zero_stage=3, seq_len=2048, recompute="none")
    small = train(mpt(24, 1536, 12), "H100", tokens=384 * 2048, batch_tokens=384 * 2048, micro_batch=24, **kw)
    big = train(mpt(32, 4096, 32), "H100", tokens=48 * 2048, batch_tokens=48 * 2048, micro_batch=6, **kw)
    assert small.mfu < big.mfu - 0.03


def test_gemm_efficiency_curve():
    a100 = get_gpu("A100-80GB")
    big = gemm_efficiency(16384, 16384, 16384, a100)
    assert big == pytest.approx(MAMF["ampere"].ceiling, rel=0.02)  # the measured ceiling, 85.9% (Bekman's table)
    # NVIDIA's guide, section 3.2: 108 SMs, one 256 x 128 tile each per wave: 109 tiles need two waves.
    assert wave_efficiency(256 * 108, 128, 108) == pytest.approx(1.0)
    assert wave_efficiency(256 * 109, 128, 108) == pytest.approx(109 / 216)
    # A decode-sized GEMM is memory-bound: far below the ceiling.
    assert gemm_efficiency(8, 12288, 12288, a100) < 0.05
    # The fitted scale multiplies the ceiling, capped at the peak.
    assert gemm_efficiency(16384, 16384, 16384, a100, scale=0.5) == pytest.approx(big / 2, rel=0.02)
    assert gemm_efficiency(16384, 16384, 16384, a100, scale=5.0) <= 1.0


def test_constants_change_the_prediction_the_expected_way():
    k = load_constants()
    cfg = GPT3
    base = step(cfg, recompute="full")
    slower = StepConstants(gemm_scale={g: v * 0.8 for g, v in k.gemm_scale.items()},
                           memory_traffic=k.memory_traffic, comm_efficiency=k.comm_efficiency)
    assert step(cfg, recompute="full", constants=slower).seconds > base.seconds
    worse_links = StepConstants(gemm_scale=k.gemm_scale, memory_traffic=k.memory_traffic,
                                comm_efficiency=k.comm_efficiency / 2)
    assert step(cfg, recompute="full", constants=worse_links).parts["tp_comm"] == pytest.approx(
        2 * base.parts["tp_comm"], rel=0.2)


def test_step_time_directly_and_its_errors():
    st = step_time(mpt(12, 768, 12), get_gpu("H100"), tp=1, pp=1, dp=8, zero=3, micro_batches=2, micro_batch=40,
                   seq_len=2048, recompute="none", optimizer_bytes=1e9)
    assert st.seconds > 0 and st.parts["optimizer"] > 0 and st.parts["bubble"] == 0
    assert 0 < st.gemm_efficiency < 1
    with pytest.raises(ValueError, match="--attention must be one of flash, unfused"):
        step_time(mpt(12, 768, 12), get_gpu("H100"), tp=1, pp=1, dp=8, micro_batches=2, seq_len=2048,
                  attention="sdpa")


@pytest.mark.parametrize("kwargs, message", [
    (dict(schedule="zigzag"), "--schedule must be one of gpipe, 1f1b, interleaved-1f1b, zero-bubble"),
    (dict(schedule="1f1b", stages_per_rank=2), "runs one stage per rank"),
    (dict(stages_per_rank=0), "--stages-per-rank must be a positive integer"),
])
def test_bad_schedule_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        train("gpt4", "A100-80GB", 25_000, **kwargs)
