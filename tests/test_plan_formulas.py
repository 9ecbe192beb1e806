"""The planner's formulas against hand-worked numbers and slow, obviously correct oracles (issue 3).

Oracles: exact enumeration of every routing of a few tokens and a Monte-Carlo simulation of random
top-k routing for the expert coverage; `moekit.counts` for the parameters the pipeline layout hands
out; the trainer's FLOP count (itself checked against torch's FLOP counter) for the training FLOPs; a
linear search for the closed-form largest batch and for the bisection on a tokens/s-per-user target.
"""

import itertools
import math

import numpy as np
import pytest
from conftest import tiny_cfg

from moekit.counts import count_params, flops_per_token
from moekit.plan import expert_coverage, serve, stages, train
from moekit.plan.hardware import GPU
from moekit.plan.layout import layers_per_stage
from moekit.plan.train import activation_bytes
from moekit.presets import PRESETS, get_preset
from moekit.train.metrics import train_flops_per_token


@pytest.fixture(autouse=True)
def _no_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))


def toy_gpu(**changes) -> GPU:
    """1 GB/s of memory, 1e18 FLOP/s, exact efficiencies: a decode step is just bytes / 1e9 seconds."""
    base = dict(name="toy", memory_gb=100, hbm_gb_s=1, tflops={"bf16": 1e6}, nvlink_gb_s=1, internode_gb_s=1,
                bandwidth_efficiency=1.0, flops_efficiency=1.0, allreduce_latency_us=0, hop_latency_us=0)
    return GPU(**{**base, **changes})


# ---- expert coverage -----------------------------------------------------------------------------

def test_coverage_hand_worked():
    assert expert_coverage(16, 2, 1) == pytest.approx(2)  # batch 1 reads exactly its top-2
    # Two tokens: 4 assignments, less the expected overlap of two random pairs, 2 x 2 / 16 (each of the
    # second token's 2 experts is one of the first token's 2 with probability 2/16).
    assert expert_coverage(16, 2, 2) == pytest.approx(4 - 2 * 2 / 16)  # 3.75
    assert expert_coverage(16, 2, 8) == pytest.approx(10.5023, abs=1e-4)
    assert expert_coverage(16, 2, 0) == 0
    assert expert_coverage(16, 2, 4096) == pytest.approx(16)
    assert expert_coverage(1, 1, 100) == 1  # a dense MLP is one "expert", always read


@pytest.mark.parametrize("n_expert, top_k, tokens", [(4, 2, 3), (5, 2, 2), (6, 3, 3), (8, 2, 2), (5, 1, 4)])
def test_coverage_equals_the_mean_over_every_routing(n_expert, top_k, tokens):
    # Oracle: every way the tokens can pick their k distinct experts, all equally likely; the mean
    # number of distinct experts touched, exactly.
    subsets = list(itertools.combinations(range(n_expert), top_k))
    touched = [len(set().union(*picks)) for picks in itertools.product(subsets, repeat=tokens)]
    assert expert_coverage(n_expert, top_k, tokens) == pytest.approx(sum(touched) / len(touched), rel=1e-12)


@pytest.mark.parametrize("n_expert, top_k, tokens",
                         [(16, 2, 1), (16, 2, 8), (8, 2, 3), (64, 8, 16), (16, 2, 40)])
def test_coverage_matches_monte_carlo_random_top_k(n_expert, top_k, tokens):
    # Oracle: route each token to a uniform random k-subset of experts (distinct, like top-k), count
    # the distinct experts of the batch; the mean over 4,000 batches must sit within 4 standard errors.
    rng = np.random.default_rng(0)
    trials = 4000
    picks = np.argsort(rng.random((trials, tokens, n_expert)), axis=-1)[..., :top_k]
    touched = np.zeros((trials, n_expert), dtype=bool)
    np.put_along_axis(touched, picks.reshape(trials, -1), True, axis=1)
    counts = touched.sum(axis=1)
    stderr = max(counts.std() / math.sqrt(trials), 1e-9)
    assert abs(counts.mean() - expert_coverage(n_expert, top_k, tokens)) < 4 * stderr + 1e-9


# ---- pipeline layout -----------------------------------------------------------------------------

def test_layers_per_stage_gives_the_ends_fewer():
    assert layers_per_stage(120, 15) == [8] * 15  # GPT-4 training (SPEC 3)
    split = layers_per_stage(120, 16)  # GPT-4 inference (SPEC 4): the head and tail stages hold 7
    assert sum(split) == 120 and split[0] == split[-1] == 7 and max(split) == 8
    assert layers_per_stage(5, 1) == [5]


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("pp", [1, 2, 3])
def test_stages_hand_out_exactly_the_counted_parameters(name, pp):
    # Oracle: moekit.counts. Every parameter sits on one stage (a tied embedding also on the last one
    # when pp > 1, as Megatron-LM keeps it), and the FLOPs per token add up to counts' figure.
    cfg = get_preset(name)
    c = count_params(cfg)
    st = stages(cfg, pp)
    dup = c.embedding if cfg.tie_embeddings and pp > 1 else 0
    assert sum(s.params for s in st) == pytest.approx(c.total + dup, rel=1e-12)
    assert 2 * sum(s.matmul_active for s in st) == pytest.approx(flops_per_token(cfg).matmul, rel=1e-12)
    assert sum(s.layers for s in st) == cfg.n_layer
    assert st[0].embedding > 0 or (pp == 1 and cfg.tie_embeddings)  # tied, one stage: it is the lm_head
    assert sum(s.experts for s in st) == pytest.approx(c.experts, rel=1e-12)


# ---- training ------------------------------------------------------------------------------------

def test_activation_bytes_hand_worked():
    cfg = tiny_cfg(d_model=8, n_head=2, n_kv_head=1, d_ff=16, moe_every=1, mlp="gelu")  # heads of 4, 4 experts
    # MoE layer, h=8, q=8, kv=4, f=16, k=2: d_model-sized 4h + 2kh = 64; split 2q + k * 2f = 80, + 2kv = 8;
    # router 2E = 8 (fp32 logits counted in bf16 units); x 2 bytes.
    assert activation_bytes(cfg, True, tp=1, sequence_parallel=True) == 2 * (64 + 80 + 8 + 8)
    # tp 2: the one KV head is replicated (8 stays), the rest splits; without sequence parallelism the
    # d_model-sized tensors stay whole.
    assert activation_bytes(cfg, True, tp=2, sequence_parallel=True) == 2 * (32 + 40 + 8 + 8)
    assert activation_bytes(cfg, True, tp=2, sequence_parallel=False) == 2 * (64 + 40 + 8 + 8)
    assert activation_bytes(cfg, False, tp=1, sequence_parallel=True) == 2 * (32 + (16 + 32) + 8)  # dense


def test_zero_stages_shard_what_the_paper_says():
    # tiny preset on 4 GPUs, tp = pp = 1 (dp = 4): P parameters, 2 B weights + 2 B grads + 12 B Adam
    # (Rajbhandari et al. 2020). ZeRO-1 shards Adam, -2 also grads, -3 also weights, over dp.
    cfg = get_preset("tiny")
    P = count_params(cfg).total
    kw = dict(n_gpus=4, tokens=1e9, mfu=0.5, tp=1, pp=1, batch_tokens=4 * 256, seq_len=256, recompute="none")
    m = [train(cfg, "H100", zero_stage=z, **kw).memory for z in range(4)]
    assert (m[0].weights, m[0].gradients, m[0].optimizer) == pytest.approx((2 * P, 2 * P, 12 * P))
    assert (m[1].weights, m[1].gradients, m[1].optimizer) == pytest.approx((2 * P, 2 * P, 3 * P))
    assert (m[2].weights, m[2].gradients, m[2].optimizer) == pytest.approx((2 * P, P / 2, 3 * P))
    st = stages(cfg, 1)[0]
    gathered = 2 * 2 * (st.dense + st.experts) / st.layers  # two layers gathered at a time (FSDP prefetch)
    assert m[3].weights == pytest.approx(P / 2 + gathered)
    assert len({x.activations for x in m}) == 1  # ZeRO does not touch activations
    # Expert parallelism 2: experts split over 2 ranks, their states sharded over the other dp / ep = 2.
    E = count_params(cfg).experts
    ep = train(cfg, "H100", zero_stage=1, ep=2, **kw).memory
    assert ep.weights == pytest.approx(2 * (P - E + E / 2))
    assert ep.optimizer == pytest.approx(12 * ((P - E) / 4 + E / 2 / 2))


def test_recompute_keeps_only_layer_inputs():
    cfg = get_preset("gpt4-mini")
    kw = dict(n_gpus=8, tokens=1e9, mfu=0.5, tp=1, pp=1, batch_tokens=8 * 1024, seq_len=1024)
    full, none = train(cfg, "H100", recompute="full", **kw), train(cfg, "H100", recompute="none", **kw)
    logits = 4 * cfg.vocab_size * 1024  # last stage's fp32 logits, kept either way
    per_layer = activation_bytes(cfg, True, 1, True) * 1024
    assert none.memory.activations == pytest.approx(cfg.n_layer * per_layer + logits)
    assert full.memory.activations == pytest.approx(cfg.n_layer * 2 * cfg.d_model * 1024 + per_layer + logits)


def test_bubble_and_time_hand_worked():
    cfg = get_preset("gpt4-mini")
    # dp = 16 / (1 x 4) = 4 replicas; 32 sequences per step -> 8 micro-batches each; bubble 3 / 11.
    p = train(cfg, "A100-80GB", n_gpus=16, tokens=1e12, mfu=0.5, tp=1, pp=4, batch_tokens=32 * 1024,
              seq_len=1024)
    assert (p.dp, p.micro_batches, p.bubble) == (4, 8, pytest.approx(3 / 11))
    # The planner counts what the trainer's MFU counts (moekit.train.metrics, checked against torch's FLOP
    # counter in test_train_loop.py): 6 x active matmul parameters per token without attention.
    flops = 1e12 * train_flops_per_token(cfg, 0)
    assert flops == pytest.approx(6 * 1e12 * flops_per_token(cfg).matmul / 2)
    assert p.flops == pytest.approx(flops)
    assert p.seconds == pytest.approx(flops / (16 * 312e12 * 0.5))
    assert p.cost == pytest.approx(16 * p.seconds / 3600 * 1.0)  # $1 per A100-hour
    # MFU from time is the inverse of time from MFU (the two directions of the same formula).
    back = train(cfg, "A100-80GB", n_gpus=16, tokens=1e12, days=p.days, tp=1, pp=4, batch_tokens=32 * 1024,
                 seq_len=1024)
    assert back.mfu == pytest.approx(0.5)
    with_attn = train(cfg, "A100-80GB", n_gpus=16, tokens=1e12, mfu=0.5, tp=1, pp=4, include_attention=True)
    assert with_attn.flops == pytest.approx(1e12 * train_flops_per_token(cfg, 1024))  # the trainer's, at 1k context


# ---- serving -------------------------------------------------------------------------------------

def test_decode_at_batch_1_reads_the_active_weights_and_the_cache():
    # SPEC 6: tokens/s <= bandwidth / (bytes of active weights + KV-cache bytes read), with equality
    # when compute and communication are free: 1 GB/s, one GPU, batch 1, 100 tokens of context.
    cfg = get_preset("tiny")
    p = serve(cfg, toy_gpu(), tp=1, pp=1, batch=1, context=100)
    kv = (100 + 1) * 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * 2
    bytes_read = 2 * count_params(cfg).active + kv
    assert p.decode.bytes == pytest.approx(bytes_read)
    assert p.tokens_per_s_per_user == pytest.approx(1e9 / bytes_read, rel=1e-6)
    assert p.tokens_per_s == pytest.approx(p.tokens_per_s_per_user)
    assert p.experts_touched == pytest.approx(2)


def test_tensor_parallel_all_reduce_hand_worked():
    # Ring all-reduce: 2 (tp - 1) / tp x bytes / link bandwidth (+ latency, 0 here), 2 per layer.
    cfg = get_preset("tiny")
    p = serve(cfg, toy_gpu(), tp=2, pp=1, batch=1, context=100)
    act = 1 * cfg.d_model * 2
    assert p.decode.comm_s == pytest.approx(2 * cfg.n_layer * (2 * 1 / 2 * act / 1e9))
    lat = serve(cfg, toy_gpu(allreduce_latency_us=10), tp=2, pp=1, batch=1, context=100)
    assert lat.decode.comm_s == pytest.approx(p.decode.comm_s + 2 * cfg.n_layer * 10e-6)
    assert serve(cfg, toy_gpu(), tp=1, pp=1, batch=1, context=100).decode.comm_s == 0


def test_batch_8_reads_far_more_expert_weights_than_batch_1():
    # GPT-4 on 128 H100 (tp 8 x pp 16), 8k context: subtract the non-expert weights and the KV cache
    # from the bytes a stage reads; what is left is expert weights, in the ratio of the coverages.
    cfg = get_preset("gpt4")
    one, eight = serve(cfg, "H100", batch=1), serve(cfg, "H100", batch=8)
    assert one.decode.stage == eight.decode.stage  # the same (8-layer) stage is the slowest
    st = stages(cfg, 16)[one.decode.stage]
    kv_seq = (cfg.max_seq_len + 1) * st.layers * 2 * cfg.head_dim * 2  # MQA head replicated per tp rank
    dense = (st.dense + st.lm_head) / 8 * 2
    experts_1 = one.decode.bytes - kv_seq - dense
    experts_8 = eight.decode.bytes - 8 * kv_seq - dense
    assert experts_1 == pytest.approx(st.moe_layers * 2 * st.expert_layer / 8 * 2, rel=1e-9)  # 2 experts
    assert experts_8 / experts_1 == pytest.approx(expert_coverage(16, 2, 8) / 2, rel=1e-9)  # 5.25x
    assert eight.experts_touched == pytest.approx(10.50, abs=0.01)


def test_largest_batch_matches_a_linear_search():
    # Oracle: try every batch until one does not fit.
    cases = [dict(model="gpt4", gpu="A100-40GB", context=8192),
             dict(model="gpt4", gpu="A100-80GB", context=6144),
             dict(model="tiny", gpu=toy_gpu(memory_gb=0.05), tp=1, pp=1, context=256)]
    for case in cases:
        fit = serve(**case).max_batch
        b = 1
        while True:
            try:
                serve(**case, batch=b + 1)
            except ValueError as e:
                assert "does not fit" in str(e)
                break
            b += 1
        assert fit == b, case


def test_target_speed_matches_a_linear_scan():
    case = dict(model="gpt4", gpu="A100-80GB", context=6144)
    top = serve(**case).max_batch
    speeds = [serve(**case, batch=b).tokens_per_s_per_user for b in range(1, top + 1)]
    assert all(a >= b for a, b in zip(speeds, speeds[1:], strict=False))  # bigger batch, slower user
    for target in (8.33, 5.0, speeds[10]):
        expect = max(b for b, s in enumerate(speeds, 1) if s >= target)
        got = serve(**case, target_tps=target)
        assert got.batch == expect and got.tokens_per_s_per_user >= target


def test_expert_parallel_splits_the_experts():
    cfg = get_preset("mixtral-8x7b")
    c = count_params(cfg)
    tp = serve(cfg, "H100", tp=8, pp=1, batch=16, context=4096)
    ep = serve(cfg, "H100", tp=1, pp=1, ep=8, batch=16, context=4096)
    # Same 8 GPUs, same expert bytes each; attention weights are replicated under expert parallelism.
    assert tp.n_gpus == ep.n_gpus == 8
    assert ep.memory.weights - tp.memory.weights == pytest.approx((c.total - c.experts) * 2 * (1 - 1 / 8))
    assert ep.decode.comm_s > 0  # the all-to-alls
