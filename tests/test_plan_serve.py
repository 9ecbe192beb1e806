"""Issue 3 acceptance, GPT-4 serving (SPEC section 4).

Assumptions (the report states them too, `moekit.plan.report.SCENARIO`):
- 128 GPUs as 8-way tensor x 16-way pipeline, 16 micro-batches in flight, the gpt4 preset;
- "8k context": 8k-token sequences, half prompt and half output, under continuous batching with a
  paged cache, so a decoding sequence holds 6,144 tokens on average; cost is per output token;
- "high utilization": the largest batch that fits in 90% of HBM, the cluster busy 100% of the time;
- A100-80GB with fp16 weights and cache at $1/hour; H100 with FP8 weights, matmuls and cache at
  $2/hour; decode kernels at 80% of peak bandwidth, matmuls at 70% of peak FLOP/s.
The memory claims use full 8k and 32k windows in the cache (the article's worst case).
"""

import pytest

from moekit.counts import kv_bytes_per_token
from moekit.plan import serve
from moekit.plan.report import SERVE_A100, SERVE_H100, USEFUL_BATCH
from moekit.presets import get_preset


@pytest.fixture(autouse=True)
def _no_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))


def test_cost_per_1k_tokens_within_1_5x_of_the_article():
    a100, h100 = serve(**SERVE_A100), serve(**SERVE_H100)
    assert 0.0049 / 1.5 <= a100.cost_per_1k_output <= 0.0049 * 1.5  # $0.0072
    assert 0.0021 / 1.5 <= h100.cost_per_1k_output <= 0.0021 * 1.5  # $0.0019
    assert a100.cost_per_1k_output >= 2 * h100.cost_per_1k_output  # H100 3.8x cheaper
    assert a100.n_gpus == h100.n_gpus == 128 and a100.batch == a100.max_batch
    # The dollars follow from the throughput: cluster $/hour / (tokens/hour / 1,000) (SPEC 6).
    assert a100.cost_per_1k_output == pytest.approx(128 * 1.0 / (a100.tokens_per_s * 3600 / 1000))


def test_poor_utilization_more_than_doubles_the_cost():
    a100 = serve(**SERVE_A100)
    idle = serve(**SERVE_A100, utilization=0.4)
    assert idle.cost_per_1k_output == pytest.approx(a100.cost_per_1k_output / 0.4)
    assert serve(**SERVE_A100, batch=USEFUL_BATCH).cost_per_1k_output > 2 * a100.cost_per_1k_output


def test_weights_per_gpu_28_to_33_gb_at_fp16_and_half_at_fp8():
    fp16 = serve("gpt4", "A100-80GB", tp=8, pp=16, batch=1)
    fp8 = serve("gpt4", "H100", tp=8, pp=16, weight_dtype="fp8", batch=1)
    assert 28e9 <= fp16.memory.weights <= 33e9  # 30.5 GB on the fullest (8-layer) stage
    assert fp8.memory.weights == pytest.approx(fp16.memory.weights / 2)


def test_32k_does_not_fit_40gb_a100_at_a_useful_batch_but_8k_fits_capped():
    # A useful batch: 8 sequences per micro-batch, so that each of 16 experts sees one token (top-2).
    k8 = serve("gpt4", "A100-40GB", tp=8, pp=16, context=8192)
    k32 = serve("gpt4-32k", "A100-40GB", tp=8, pp=16, context=32768)
    assert k32.max_batch < USEFUL_BATCH <= k8.max_batch  # 2 and 9
    assert k8.max_batch < 64  # capped: an 80 GB A100 takes 76
    with pytest.raises(ValueError, match="batch 8 does not fit"):
        serve("gpt4-32k", "A100-40GB", tp=8, pp=16, context=32768, batch=USEFUL_BATCH)
    # Without MQA (168 KV heads) not even batch 1 of 8k fits.
    mha = get_preset("gpt4").replace(n_kv_head=168)
    with pytest.raises(ValueError, match="not even batch 1 fits"):
        serve(mha, "A100-40GB", tp=8, pp=16, context=8192)


def test_kv_bytes_per_token_mqa_and_mha():
    cfg = get_preset("gpt4")
    # 2 (K and V) x 120 layers x KV heads x 128 x 2 bytes (SPEC 6).
    assert kv_bytes_per_token(cfg, 2) == 2 * 120 * 1 * 128 * 2 == 61_440
    assert kv_bytes_per_token(cfg, 2, n_kv_head=cfg.n_head) == 2 * 120 * 168 * 128 * 2 == 10_321_920
    # On a tensor-parallel GPU the one MQA head is replicated, 168 MHA heads split 8 ways (21 each).
    mqa = serve(cfg, "H100", batch=1)
    mha = serve(cfg.replace(n_kv_head=168), "H200", batch=1)
    st_layers = 8
    assert mqa.memory.kv_per_sequence == 8192 * st_layers * 2 * 1 * 128 * 2
    assert mha.memory.kv_per_sequence == 8192 * st_layers * 2 * 21 * 128 * 2


def test_outputs_are_consistent():
    p = serve(**SERVE_H100)
    # Per user: one token per pipeline round of 16 micro-batches; cluster: every sequence in flight.
    assert p.tokens_per_s == pytest.approx(p.batch * p.micro_batches / p.token_seconds)
    assert p.tokens_per_s_per_user == pytest.approx(1 / p.token_seconds)
    assert 0 < p.mfu < p.mbu < 1  # decode is bandwidth-bound
    assert p.cost_per_1k_input < p.cost_per_1k_output / 2  # prefill is cheap (SPEC 4)
    assert p.cost_per_1k(1000, 1000) == pytest.approx((p.cost_per_1k_input + p.cost_per_1k_output) / 2)
    assert p.memory.total <= p.memory.usable


def test_target_tokens_per_s_per_user():
    p = serve(**SERVE_A100, target_tps=8.33)
    assert p.tokens_per_s_per_user >= 8.33
    assert serve(**SERVE_A100, batch=p.batch + 1).tokens_per_s_per_user < 8.33
    with pytest.raises(ValueError, match="no batch reaches 1000 tokens/s per user"):
        serve(**SERVE_A100, target_tps=1000)


@pytest.mark.parametrize("kwargs, message", [
    (dict(gpu="V100"), "unknown GPU 'V100'; known: A100-40GB, A100-80GB, H100, H200, B200, MI300X"),
    (dict(tp=5), "tensor-parallel degree 5 does not divide the 168 attention heads of gpt4; choose --tp"),
    (dict(gpu="A100-40GB", batch=64), r"batch 64 does not fit: .* need 65.2 GB per GPU on stage 1, 36.0 GB "
                                      r"usable \(over by 29.2 GB\); the largest batch that fits is 9"),
    (dict(gpu="A100-40GB", pp=4), "gpt4 does not fit: stage 3 needs 115.0 GB per GPU .* add pipeline stages"),
    (dict(batch=4, target_tps=10), "give --batch or --target-tps, not both"),
    (dict(gpu="A100-40GB", weight_dtype="fp8", compute_dtype="fp8"), "A100-40GB has no fp8 peak"),
    (dict(weight_dtype="fp5"), "--weight-dtype must be one of"),
    (dict(n_gpus=100), "not a multiple of one replica's tp x pp x ep = 128"),
    (dict(micro_batches=17), "--micro-batches must be between 1 and the pipeline degree 16"),
    (dict(utilization=0), "--utilization is the busy fraction"),
    (dict(ep=3), "expert-parallel degree 3 must divide the 16 experts"),
])
def test_bad_serving_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        serve("gpt4", **{"gpu": "H100", **kwargs})


def test_engine_overhead_adds_per_layer_and_per_step_time():
    """An entry's software overhead fields (moekit/bench_hardware.py measures them) add layers x layer_overhead_us to
    each stage's step and step_overhead_us once per token. The datasheet entries have none of their own: planned as
    the article does (roofline=True) they get no floor; planned from their parts (the default) the fitted floors of
    moekit/plan/serve_time.py, with the entry's own fields on top."""
    from moekit.plan.hardware import get_gpu

    h200 = get_gpu("H200")
    slow = h200.replace(layer_overhead_us=100.0, step_overhead_us=50.0)
    kw = dict(n_gpus=1, tp=1, pp=1, batch=1, context=512, roofline=True)
    base, over = serve("gpt4-mini", h200, **kw), serve("gpt4-mini", slow, **kw)
    assert base.decode.overhead_s == 0 and over.decode.overhead_s == pytest.approx(8 * 100e-6)
    assert over.token_seconds == pytest.approx(base.token_seconds + 8 * 100e-6 + 50e-6)
    assert over.tokens_per_s_per_user < base.tokens_per_s_per_user / 10  # a small model is latency-bound
    # With 2 pipeline stages each stage pays for its own 4 layers.
    two = serve("gpt4-mini", slow, n_gpus=2, tp=1, pp=2, batch=1, context=512, micro_batches=1, roofline=True)
    assert two.decode.overhead_s == pytest.approx(4 * 100e-6)
    kw["roofline"] = False
    parts, parts_slow = serve("gpt4-mini", h200, **kw), serve("gpt4-mini", slow, **kw)
    assert parts.decode.overhead_s > 0
    assert parts_slow.decode.overhead_s == pytest.approx(parts.decode.overhead_s + 8 * 100e-6)
    assert parts_slow.token_seconds == pytest.approx(parts.token_seconds + 8 * 100e-6 + 50e-6)
