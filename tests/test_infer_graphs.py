"""CUDA-graph decode (moekit/infer/cuda_graphs.py): the padded, static-shape decode forward that the
graphs capture must equal the runner's ragged forward, and padding must touch nothing but the
scratch slot. On a CPU the static forward runs eagerly (capture=False); on a GPU it is captured and
replayed, and the same checks run against the eager runner.
"""

import pytest
import torch
from conftest import greedy_reference, random_prompts, tiny_model

from moekit.infer.cuda_graphs import DecodeGraphs
from moekit.infer.engine import Engine
from moekit.infer.sampler import SamplingParams


def compare_every_decode_step(engine: Engine, graphs: DecodeGraphs, atol: float, exact_routing: bool = True):
    """Wrap the runner: each decode-only step runs eagerly, then through `graphs` on the same items,
    and both results are compared; the eager result goes on. Returns the (B, Q) shapes compared. In
    bf16 a padded batch may round a router logit differently and flip a near tie, so there only the
    number of routed assignments (real tokens x top_k per layer: no padding counted) must agree."""
    eager, cache, sizes = engine.runner.forward, engine.cache, []
    scratch = cache.scratch_slot

    def both(items):
        out = eager(items)
        if not graphs.can_run(items):
            return out
        P = cache.block_size
        touched = sorted({it.block_ids[p // P] * P + p % P for it in items
                          for p in range(it.start, it.start + len(it.token_ids))})
        before = [k.clone() for k in cache.k_SGDh + cache.v_SGDh]
        g = graphs.run(items)
        torch.testing.assert_close(g.logits_RV, out.logits_RV, rtol=0, atol=atol)
        assert g.tokens_per_expert_LE.dtype == out.tokens_per_expert_LE.dtype
        if exact_routing:
            assert torch.equal(g.tokens_per_expert_LE, out.tokens_per_expert_LE)  # real tokens only, not padding
        assert torch.equal(g.tokens_per_expert_LE.sum(1), out.tokens_per_expert_LE.sum(1))
        untouched = torch.ones(scratch, dtype=torch.bool)
        untouched[touched] = False
        for b, a in zip(before, cache.k_SGDh + cache.v_SGDh, strict=True):
            assert torch.equal(a[:scratch][untouched.to(a.device)], b[:scratch][untouched.to(b.device)])
            torch.testing.assert_close(a[touched], b[touched], rtol=0, atol=atol)  # rewritten, same values
        sizes.append(graphs.shape(items))
        return out

    engine.runner.forward = both
    return sizes


def test_padded_static_decode_equals_the_ragged_forward_and_pads_only_write_scratch():
    model = tiny_model(3)
    engine = Engine(model, num_blocks=64, block_size=4, max_num_batched_tokens=64, enforce_eager=True)
    graphs = DecodeGraphs(engine.runner, engine.max_model_len, 16, capture=False)
    sizes = compare_every_decode_step(engine, graphs, atol=1e-5)
    prompts = random_prompts([1, 3, 4, 5, 9, 14, 17], seed=4)  # crossing block boundaries
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (9, 3, 12, 5, 7, 10, 6)]
    outs = engine.generate(prompts, params)
    for o, p, sp in zip(outs, prompts, params, strict=True):
        assert o.token_ids == greedy_reference(model, p, sp.max_tokens)
    assert (8, 1) in sizes and (1, 1) in sizes  # 7 requests padded to 8 rows; one alone
    assert graphs.replays == 0 and set(graphs.static) == set(sizes)
    engine.check_idle()


def test_engine_decodes_through_the_padded_path_and_matches_full_recomputation():
    model = tiny_model(5, n_kv_head=1)  # MQA, as GPT-4
    engine = Engine(model, num_blocks=48, block_size=4, max_num_batched_tokens=32, enforce_eager=True)
    engine.graphs = graphs = DecodeGraphs(engine.runner, engine.max_model_len, 8, capture=False)
    prompts = random_prompts([2, 6, 11, 3, 8], seed=9)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for o, p in zip(outs, prompts, strict=True):
        assert o.token_ids == greedy_reference(model, p, 8)
    assert graphs.static and graphs.replays == 0
    engine.check_idle()


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_speculative_verification_runs_the_padded_path_and_keeps_greedy_output(proposer):
    model = tiny_model(6)
    kw = {"ngram": True} if proposer == "ngram" else {"draft": tiny_model(7, n_layer=1)}
    engine = Engine(model, num_blocks=96, block_size=4, max_num_batched_tokens=64, num_spec_tokens=3,
                    enforce_eager=True, **kw)
    graphs = DecodeGraphs(engine.runner, engine.max_model_len, 16, capture=False)
    shapes = compare_every_decode_step(engine, graphs, atol=1e-5)
    prompts = [[5, 6, 7, 8] * 5, [9, 10, 11] * 4, [12, 13] * 3 + [14]]  # repetitive: n-gram lookup proposes
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    for o, p in zip(outs, prompts, strict=True):
        assert o.token_ids == greedy_reference(model, p, 10)
    assert any(q > 1 for _, q in shapes)  # verification steps (last token + drafts) went through it
    assert engine.metrics()["spec_drafted"] > 0
    engine.check_idle()


def test_capture_all_builds_every_size_up_front_and_steps_only_reuse_them():
    model = tiny_model(8)
    engine = Engine(model, num_blocks=64, block_size=4, max_num_batched_tokens=64, num_spec_tokens=3, ngram=True,
                    enforce_eager=True)
    engine.graphs = graphs = DecodeGraphs(engine.runner, engine.max_model_len, 8, capture=False)
    assert graphs.capture_all((1, 4)) == 8 and set(graphs.static) == {(b, q) for b in (1, 2, 4, 8) for q in (1, 4)}
    assert graphs.capture_all((1, 4)) == 0  # nothing left to build
    built = set(graphs.static)
    prompts = [[5, 6, 7] * 4, [9, 10] * 5, [3, 4, 5, 6]]
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))
    for o, p in zip(outs, prompts, strict=True):
        assert o.token_ids == greedy_reference(model, p, 9)
    assert set(graphs.static) - built <= {(b, q) for b in (1, 2, 4, 8) for q in (2, 3)}  # shorter drafts: lazily
    engine.check_idle()


def test_capacity_dropping_and_oversized_batches_stay_eager():
    model = tiny_model(1, capacity_factor=1.0)
    engine = Engine(model, num_blocks=32, block_size=4, enforce_eager=True)
    graphs = DecodeGraphs(engine.runner, engine.max_model_len, 4, capture=False)
    from moekit.infer.runner import RunItem

    one = [RunItem([1], 0, [0], 1)]
    assert not graphs.can_run(one) and "capacity" in graphs.eager_reason[(1, 1)]
    dense = Engine(tiny_model(1, n_expert=1, top_k=1), num_blocks=32, block_size=4, enforce_eager=True)
    g = DecodeGraphs(dense.runner, dense.max_model_len, 4, capture=False)
    assert g.sizes == [1, 2, 4] and g.can_run(one) and not g.can_run(one * 5)  # 5 > the largest size
    assert not g.can_run([RunItem([1, 2], 0, [0], 1)])  # a prefill chunk: not every token's logits
    assert g.can_run([RunItem([1, 2], 0, [0], 2)]) and g.shape([RunItem([1, 2], 0, [0], 2)] + one) == (2, 2)
    assert not g.can_run([RunItem(list(range(9)), 0, [0, 1, 2], 9)])  # longer than any verification


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_graphs_replay_the_eager_decode(dtype):
    model = tiny_model(3).cuda().to(dtype)
    engine = Engine(model, num_blocks=64, block_size=4, max_num_batched_tokens=64, enforce_eager=True)
    graphs = DecodeGraphs(engine.runner, engine.max_model_len, 16)
    fp32 = dtype == torch.float32
    sizes = compare_every_decode_step(engine, graphs, atol=1e-4 if fp32 else 5e-2, exact_routing=fp32)
    prompts = random_prompts([1, 3, 4, 5, 9, 14, 17], seed=4)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (9, 3, 12, 5, 7, 10, 6)]
    engine.generate(prompts, params)
    assert sizes and graphs.replays == len(sizes)
    # fp32 experts sort on the host above 2 tokens, so only sizes 1 and 2 are captured; bf16 captures all.
    assert set(graphs.static) == ({(1, 1), (2, 1)} if fp32 else set(sizes))
    engine.check_idle()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_engine_uses_graphs_by_default_and_greedy_output_is_unchanged():
    model = tiny_model(2).cuda()
    prompts = random_prompts([3, 9], seed=2)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    graphed = Engine(model, num_blocks=64, block_size=4)
    outs = graphed.generate(prompts, params)
    assert graphed.graphs is not None and graphed.graphs.replays > 0
    for o, p in zip(outs, prompts, strict=True):
        assert o.token_ids == greedy_reference(model, p, 12)
    assert Engine(model, num_blocks=64, block_size=4, enforce_eager=True).graphs is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_captured_verification_graphs_replay_the_eager_forward_in_bf16():
    model = tiny_model(6).cuda().to(torch.bfloat16)
    engine = Engine(model, num_blocks=96, block_size=4, max_num_batched_tokens=64, num_spec_tokens=3, ngram=True,
                    enforce_eager=True)
    graphs = DecodeGraphs(engine.runner, engine.max_model_len, 16)
    shapes = compare_every_decode_step(engine, graphs, atol=5e-2, exact_routing=False)
    prompts = [[5, 6, 7, 8] * 5, [9, 10, 11] * 4, [12, 13] * 3 + [14]]
    engine.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert any(q > 1 for _, q in shapes) and graphs.replays == len(shapes) and set(graphs.static) == set(shapes)
    engine.check_idle()
