"""The simulator's step-time model against the planner it is built from, and the simulator against the planner's
closed form where both apply (steady load, fixed lengths)."""

import itertools
from dataclasses import dataclass

import numpy as np
import pytest

from moekit.plan.hardware import get_gpu
from moekit.plan.layout import stages
from moekit.plan.serve import _Setup, serve, stage_step
from moekit.presets import get_preset
from moekit.sim.simulator import Deployment, simulate
from moekit.sim.steptime import HardwareModel, Work, touched_distribution


@dataclass
class Q:
    arrival: float
    prompt_len: int
    output_len: int
    prefix_id: int = -1
    prefix_len: int = 0


@pytest.mark.parametrize("model,gpu,tp,pp,ep", [("gpt4", "A100-40GB", 8, 16, 1), ("gpt4", "H100", 8, 8, 2),
                                                ("gpt4-mini", "A100-80GB", 2, 3, 4), ("tiny", "H100", 1, 1, 1)])
@pytest.mark.parametrize("seqs,new,context", [(1, 1, 100), (9, 1, 8192), (64, 1, 1000), (1, 512, 300)])
def test_expected_step_equals_planner_stage_step(model, gpu, tp, pp, ep, seqs, new, context):
    """A uniform batch with routing in expectation: every stage's time, FLOPs and bytes are the planner's."""
    m = HardwareModel(model, gpu, tp=tp, pp=pp, ep=ep, expected=True)
    cfg = get_preset(model)
    s = _Setup(cfg=cfg, hw=get_gpu(gpu), stages=stages(cfg, pp), tp=tp, pp=pp, ep=ep, weight_dtype="bf16",
               kv_dtype="bf16", compute_dtype="bf16", context=cfg.max_seq_len, micro_batches=pp,
               prefill_chunk=2048, memory_fraction=0.9)
    # The planner's attention term is tokens x (context + new / 2); the simulator's causal pairs are
    # new x (context + (new + 1) / 2): the same for a decode token up to the half token, so compare on the former.
    w = Work(seqs=seqs, tokens=seqs * new, kv_tokens=seqs * (context + new), attn=seqs * new * (context + new / 2),
             logits=seqs)
    cost = m.step(w)
    ref = [stage_step(s, st, seqs, new, context) for st in s.stages]
    assert cost.stage_s == pytest.approx([x.seconds for x in ref], rel=1e-12)
    assert cost.hop_s == pytest.approx(ref[0].hop_s, rel=1e-12)
    assert cost.flops == pytest.approx(sum(x.flops for x in ref) * tp * ep, rel=1e-12)
    assert cost.bytes == pytest.approx(sum(x.bytes for x in ref) * tp * ep, rel=1e-12)


def test_sampled_routing_touches_what_uniform_routing_touches_on_average():
    m = HardwareModel("gpt4", "A100-40GB", expected=False, seed=1)
    e = HardwareModel("gpt4", "A100-40GB", expected=True)
    for tokens in (1, 8, 64):
        w = Work(tokens, tokens, tokens * 1000, tokens * 1000.5, tokens)
        touched = np.mean([m.step(w).experts_touched for _ in range(20)])
        assert touched == pytest.approx(e.step(w).experts_touched, rel=0.05)  # draws of k picks vs k-subsets


@pytest.mark.parametrize("experts,draws", [(4, 1), (4, 5), (5, 7), (3, 9)])
def test_touched_distribution_is_the_count_over_every_sequence_of_picks(experts, draws):
    """The occupancy distribution the uniform fast path draws from, against brute force: every one of E^draws
    equally likely sequences of picks, counted by how many distinct experts it touches."""
    counts = np.zeros(experts + 1)
    for picks in itertools.product(range(experts), repeat=draws):
        counts[len(set(picks))] += 1
    assert touched_distribution(experts, draws) == pytest.approx(counts / counts.sum(), abs=1e-13)


def test_uniform_fast_path_draws_what_a_multinomial_per_layer_draws():
    """The default (uniform routing, no expert parallelism) draws each layer's touched experts from the exact
    distribution; the general path draws a multinomial per layer: same mean and spread of touched experts."""
    fast = HardwareModel("gpt4", "A100-40GB", seed=3)
    general = HardwareModel("gpt4", "A100-40GB", seed=3, routing=[1.0] * 16)  # the multinomial path
    assert fast._uniform and not general._uniform
    for tokens in (1, 4, 12):
        w = Work(tokens, tokens, tokens * 1000, tokens * 1000.5, tokens)
        a = np.array([fast._expert_terms(w.tokens)[0] for _ in range(400)])  # touched per stage
        b = np.array([general._expert_terms(w.tokens)[0] for _ in range(400)])
        assert a.mean() == pytest.approx(b.mean(), rel=0.02)
        assert a.std() == pytest.approx(b.std(), rel=0.15)
    w = Work(4096, 4096, 4096 * 1000, 4096 * 1000.5, 4096)  # every expert touched: no draw at all
    assert fast.step(w).experts_touched == 16


def test_skewed_routing_and_expert_parallel_stragglers_cost_time():
    """With ep 2, a compute-bound step (prefill chunks) waits for its most loaded rank: most tokens on one
    expert is slower than balanced routing."""
    w = Work(4, 8192, 8192, 4 * 2048 * 1024.5, 4)
    balanced = HardwareModel("gpt4", "H100", tp=8, pp=8, ep=2, seed=0)
    skewed = HardwareModel("gpt4", "H100", tp=8, pp=8, ep=2, seed=0, routing=[100] + [1] * 15)
    assert sum(skewed.step(w).stage_s) > 1.2 * sum(balanced.step(w).stage_s)
    with pytest.raises(ValueError, match="16 non-negative loads"):
        HardwareModel("gpt4", "H100", routing=[1, 2, 3])


def test_deployment_that_does_not_fit_says_by_how_much():
    with pytest.raises(ValueError, match=r"does not fit .*over by \d+\.\d GB"):
        HardwareModel("gpt4", "A100-40GB", tp=8, pp=2).kv_tokens_capacity()


def test_simulator_at_steady_load_matches_the_planners_closed_form():
    """N = 16 x batch sequences arriving at once with fixed lengths: they decode together, so the simulated time per
    output token and throughput are the planner's for that batch at the mean context (prompt + output / 2)."""
    batch, prompt, output = 8, 32, 1024
    n_seq = 16 * batch
    m = HardwareModel("gpt4", "A100-80GB", tp=8, pp=16, expected=True)
    reqs = [Q(0.0, prompt, output) for _ in range(n_seq)]
    dep = Deployment(kv_tokens=m.kv_tokens_capacity(), max_num_seqs=n_seq, max_num_batched_tokens=8192,
                     max_model_len=8192)
    run = simulate(reqs, lambda i: m, dep)
    s = run.summary()
    plan = serve("gpt4", "A100-80GB", tp=8, pp=16, batch=batch, context=prompt + output // 2, prompt_len=prompt,
                 roofline=True)  # the simulator steps serve.py's roofline, not serve_time.py's floors
    assert s["completed"] == len(reqs) and s["sim"]["preemptions"] == 0
    assert s["sim"]["mean_batch_seqs"] == pytest.approx(batch, rel=0.05)
    assert s["median_tpot_ms"] / 1000 == pytest.approx(plan.token_seconds, rel=0.10)
    assert s["output_throughput"] == pytest.approx(plan.tokens_per_s, rel=0.10)
