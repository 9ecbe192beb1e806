"""Issue 3 acceptance, GPT-4 training (SPEC section 3).

Assumptions: the gpt4 preset (1.83T total, 278.9B active matmul parameters); 13T tokens counted
as seen (2 epochs of text, 4 of code); model FLOPs = 6 x N x D without the attention term, as SPEC
section 6 defines MFU; A100 peak 312 TFLOP/s bf16, H100 989; every GPU the article names busy for
the whole run; 8-way tensor x 15-way pipeline, ZeRO-1, 60M-token batches of 8k sequences, full
activation recomputation with sequence parallelism. Tolerances are the issue's.
"""

import pytest

from moekit.plan import gpt4_report, train


@pytest.fixture(autouse=True)
def _no_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))


def gpt4(**kw):
    return train("gpt4", **{"gpu": "A100-80GB", "n_gpus": 25_000, "tokens": 13e12, **kw})


def test_flops_are_6ND_2_15e25():
    assert gpt4(mfu=0.34).flops == pytest.approx(2.15e25, rel=0.03)  # 2.175e25, +1.2%


def test_25k_a100_at_32_to_36_percent_mfu_take_90_to_100_days():
    # 36% MFU -> 89.7 days, 32% -> 100.9: the article's 90-100 days within 1% (our N is 1.2% above its).
    assert 90 * 0.99 <= gpt4(mfu=0.36).days <= 100
    assert 90 <= gpt4(mfu=0.32).days <= 100 * 1.01
    assert 90 <= gpt4(mfu=0.34).days <= 100


def test_cost_at_1_dollar_per_a100_hour_is_within_15_percent_of_63m():
    p = gpt4(mfu=0.34)
    assert p.cost == pytest.approx(63e6, rel=0.15)  # $57.0M
    assert p.cost == pytest.approx(25_000 * p.days * 24 * 1.0)
    # The article disagrees with itself: 25,000 x 90-100 days x $1 = $54M-$60M, below its $63M.
    errata = "\n".join(gpt4_report().errata)
    assert "$63M is 5%-17% above the article's own 25,000 GPUs x 90-100 days x $1/hour = $54M-$60M" in errata


def test_h100_8192_gpus_55_days_2_dollars_is_21_5m():
    p = train("gpt4", "H100", 8192, 13e12, days=55, price_per_hour=2.0)
    assert p.cost == pytest.approx(21.5e6, rel=0.05)  # $21.6M
    assert 0.5 < p.mfu < 0.6  # of the bf16 peak: the article's 55 days need FP8 (28% of 1,979)
    assert train("gpt4", "H100", 8192, 13e12, days=55, dtype="fp8").mfu == pytest.approx(p.mfu * 989 / 1979)


def test_tokens_per_expert_and_layout():
    p = gpt4(mfu=0.34)
    assert p.tokens_per_expert == 7.5e6  # 60M x 2 / 16 (SPEC 3)
    assert p.layers_per_stage == [8] * 15 and p.dp == 208
    assert p.memory.weights == pytest.approx(30e9, rel=0.05)  # "~30 GB of FP16 weights per GPU"


def test_memory_per_gpu_under_zero_stages():
    # ZeRO-1 fits an 80 GB A100 but not a 40 GB one; ZeRO-3 (block FSDP) fits the 40 GB one.
    z = {s: gpt4(mfu=0.34, zero_stage=s).memory for s in range(4)}
    assert z[0].total > z[1].total > z[2].total > z[3].total
    assert z[1].fits and not gpt4(mfu=0.34, gpu="A100-40GB", zero_stage=1).memory.fits
    assert gpt4(mfu=0.34, gpu="A100-40GB", zero_stage=3).memory.fits
    # Without recomputation the activations of 15 micro-batches in flight do not fit at all.
    assert not gpt4(mfu=0.34, recompute="none").memory.fits


def test_the_pipeline_bubble_explains_part_of_the_low_mfu():
    p = gpt4(mfu=0.34)
    # 60M / 8,192 = 7,324 sequences over 208 replicas = 36 micro-batches; (15 - 1) / (36 + 15 - 1) = 28%.
    assert p.micro_batches == 36 and p.bubble == pytest.approx(14 / 50)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mfu=0.3, days=90), "give --mfu or --days, not both"),
    (dict(mfu=34), r"--mfu is a fraction in \(0, 1\]"),
    (dict(days=5), "would need .* MFU: impossible"),
    (dict(zero_stage=4), "--zero must be 0, 1, 2 or 3"),
    (dict(n_gpus=64), "cannot hold one replica"),
    (dict(tp=5), "tensor-parallel degree 5 does not divide the 168 attention heads"),
    (dict(ep=3), "expert-parallel degree 3 must divide"),
    (dict(recompute="some"), "--recompute must be one of none, selective, full"),
    (dict(gpu="V100"), "unknown GPU 'V100'; known:"),
])
def test_bad_training_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gpt4(**kwargs)
