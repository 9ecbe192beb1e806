"""The pipeline bubble, measured (issue 11, build point 4): 4 stages on 4 gloo ranks, M = 4, 8, 16 micro-batches.

    .venv/bin/python -m pytest tests/parallel/test_pipeline_bubble.py -q -s     # one 4-rank launch, 20-35 s

What is measured is production code: each stage's idle fraction of a step as `Pipeline.times` reports it (the step
`Pipeline.step`, up to the pipeline flush, minus the time inside the stage's forward/backward calls), the figure the
trainer writes as `pp_idle` to metrics.jsonl, compared with the planner's `pipeline_bubble(p, m, schedule, v)`
(moekit/plan/train.py).

On what clock. Not the host's: on a shared machine host overhead and contention enter wall time (CI once measured
1F1B at M = 16 at 0.202 against the formula's 0.158), and 4 ranks on 2 cores cannot compute side by side. The
Pipeline reads instead a modelled device clock per rank through its two seams (`Pipeline.clock`, `Pipeline.flush`):
pp_bubble_worker.py `VirtualDevice`, a Lamport clock on which each compute call of torch's schedule starts when this
rank is free and the call's inputs have been produced on the rank that produced them (stamps passed through a
FileStore), and lasts F = 1 per forward of a micro-batch on a rank, 2F per full backward (F/V and 2F/V per chunk);
ZB-V's split backward F/V for the input gradient and F/V for the weight gradient. The flush is a max over the ranks.
The schedule, the stage placement and the order of the calls are torch's and moekit's own, run for real (real
tensors, real sends); only time is modelled, so the figures are the schedules' makespans on ideal devices, the same
on any host: no sleeps, no wall-clock dependence (the runtime is the launch, ~10 s, and the real tiny compute).

What is compared, and why each stage. Narayanan et al. 2021 (section 2.2.1) count the bubble per device of a
pipeline with a synchronous flush: every device waits (p - 1) (t_f + t_b) of a step whose length is (m + p - 1)
(t_f + t_b), the same idle share (p - 1) / (m + p - 1) on the first stage as on the last (the first waits at the
end, the last at the start; `Pipeline.step` ends with the flush, so every stage is held to it).

- GPipe and 1F1B: (p - 1) / (m + p - 1); interleaved 1F1B, V = 2: (p - 1) / (V m + p - 1). Exactly, every stage
  (to 1e-12): every modelled time is a multiple of 1/2, exact in floats, and there is no host overhead any more for
  a tolerance to absorb (on the wall clock the excess was ~2 (m + p - 1) x 1-3 ms per step, hence 25% there).
- ZB-V zero-bubble, V = 2, t_f = t_b = t_w: Qi et al. 2024's ideal is 0 (only the ramps' imbalance (p - 1)(t_f +
  t_b - 2 t_w) counts there). torch's ZB-V measures (p - 1) chunk forwards of idle on every stage for M >= 2p - 1
  (the V's ramp-in: rank r starts r chunk forwards late and the flush waits for the rest), and twice that at
  M = 4 < 2p - 1 (torch builds the schedule for 2p - 1 micro-batches and drops the extra ones' slots): 0.200 /
  0.059 / 0.030 at M = 4 / 8 / 16. Held to that exactly, below 1F1B and interleaved, and the planner's
  `pipeline_bubble` now predicts these figures (it adds torch's ramp-in to Qi et al.'s imbalance).

That the clock comes from the dependencies (not from each rank's own compute): GPipe with one rank's device twice
as slow makes every other stage wait for it, by the flow-shop makespan each phase has (Johnson 1954: identical jobs
through stages of times t_s take sum(t_s) + (m - 1) max(t_s)); clocks that ignored the inputs would read 0 idle on
the slow rank and 1/2 elsewhere.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs gloo")

import pp_bubble_worker as worker  # noqa: E402  (beside this file; pytest puts tests/parallel on sys.path)
from spawn import spawn_ranks  # noqa: E402

from moekit.plan.train import pipeline_bubble  # noqa: E402

EXACT = 1e-12  # relative: see the module docstring


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    with pytest.MonkeyPatch.context() as mpatch:
        mpatch.setenv("PP_BUBBLE_CLOCK", "virtual")  # (the default; bench/pipeline_bubble.py may have set "wall")
        mpatch.delenv("PP_BUBBLE_SCHEDULES", raising=False)
        assert worker.CLOCK == "virtual", "pp_bubble_worker was imported with PP_BUBBLE_CLOCK=wall"
        return spawn_ranks(worker.run, worker.PP, tmp_path_factory.mktemp("bubble"))


def steps(ranks, case: str) -> list[list[dict]]:
    """Per stage (rank), its measured steps of `case`."""
    return [res["cases"][case]["steps"] for res in ranks]


def measured(ranks, name: str, m: int) -> list[float]:
    """Each stage's (rank's) idle fraction, averaged over the measured steps."""
    return [sum(s["idle"] for s in st) / len(st) for st in steps(ranks, f"{name}_m{m}")]


def formula(name: str, m: int) -> float:
    schedule, v = worker.SCHEDULES[name]
    return pipeline_bubble(worker.PP, m, schedule, v)


def test_report(ranks):
    """The table (pytest -s prints it): measured idle per stage, the planner's figure, their ratio."""
    print(f"\n{'schedule':18s} {'M':>3s} {'formula':>8s}  measured idle per stage        mean   ratio   step (F)")
    for name in worker.SCHEDULES:
        for m in worker.MS:
            got, want = measured(ranks, name, m), formula(name, m)
            mean = sum(got) / len(got)
            ratio = f"{mean / want:6.2f}" if want > 1e-9 else "   n/a"
            wall = ranks[0]["cases"][f"{name}_m{m}"]["steps"][-1]["wall"]
            per_stage = " ".join(f"{g:.3f}" for g in got)
            print(f"{name:18s} {m:3d} {want:8.3f}  {per_stage}  {mean:.3f} {ratio}  {wall:6.1f}")
    slow = " ".join(f"{res['slow']['steps'][-1]['idle']:.3f}" for res in ranks)
    print(f"gpipe, rank {worker.SLOW_RANK} x{worker.SLOW:g}, M={worker.SLOW_M}: idle per stage {slow}")


def test_the_clock_counts_the_modelled_compute_and_no_host_work(ranks):
    """Every stage's compute is exactly its modelled 3 F per micro-batch (all schedules: forward F, backward 2F, or
    ZB-V's F/V + F/V + F/V per chunk), so the wait for inputs is outside the Pipeline's timer; and the first step,
    which also infers the stages' shapes (extra host work and sends), reads exactly as the second."""
    for case in ranks[0]["cases"]:
        m = int(case.rsplit("_m", 1)[1])
        for stage, st in enumerate(steps(ranks, case)):
            assert len(st) == 2
            assert st[0] == {**st[1], "cpu_s": st[0]["cpu_s"]}, f"{case} stage {stage}: {st}"
            assert st[1]["compute"] == 3 * m * worker.F_RANK, f"{case} stage {stage}: {st[1]}"


@pytest.mark.parametrize("name", ["1f1b", "gpipe", "interleaved-1f1b"])
@pytest.mark.parametrize("m", worker.MS)
def test_measured_bubble_is_the_formulas(ranks, name, m):
    """Every stage's idle share is (p - 1) / (m + p - 1), interleaved (p - 1) / (V m + p - 1), exactly."""
    want = formula(name, m)
    v = worker.SCHEDULES[name][1]
    assert want == pytest.approx(3 / (v * m + 3))
    for stage, g in enumerate(measured(ranks, name, m)):
        assert g == pytest.approx(want, rel=EXACT), f"{name} M={m} stage {stage}: measured {g:.4f}, formula {want:.4f}"


@pytest.mark.parametrize("m", worker.MS)
def test_interleaving_and_zero_bubble_shrink_it(ranks, m):
    one, inter, zb = (measured(ranks, name, m) for name in ("1f1b", "interleaved-1f1b", "zero-bubble"))
    assert sum(inter) < sum(one), (inter, one)
    assert sum(zb) < sum(inter), (zb, inter)


@pytest.mark.parametrize("m", worker.MS)
def test_zero_bubble_leaves_the_ramp_in_unfilled(ranks, m):
    """torch's ZB-V: (p - 1) chunk forwards idle per stage at M >= 2p - 1, 2 (p - 1) below (module docstring)."""
    p, f_chunk = worker.PP, worker.F_RANK / 2
    chunks = (p - 1) * (1 if m >= 2 * p - 1 else 2)
    for stage, st in enumerate(steps(ranks, f"zero-bubble_m{m}")):
        idle = st[-1]["wall"] - st[-1]["compute"]
        assert idle == chunks * f_chunk, f"ZB-V M={m} stage {stage}: idle {idle} F, not {chunks} chunk forwards"
        # The planner's figure for torch's ZB-V (moekit/plan/train.py pipeline_bubble) is this measurement.
        assert st[-1]["idle"] == pytest.approx(formula("zero-bubble", m), rel=EXACT), (m, stage, st[-1])


def test_a_slow_device_holds_the_others_up(ranks):
    """GPipe, M = 4, rank 1's device twice as slow: each phase (forwards, then backwards) takes the flow-shop
    makespan sum(t_s) + (M - 1) max(t_s); every stage's idle is that step minus its own compute."""
    m, f = worker.SLOW_M, worker.F_RANK
    slow = [worker.SLOW if r == worker.SLOW_RANK else 1.0 for r in range(worker.PP)]
    t_fwd, t_bwd = [f * k for k in slow], [2 * f * k for k in slow]
    step = sum(t_fwd) + (m - 1) * max(t_fwd) + sum(t_bwd) + (m - 1) * max(t_bwd)
    for stage, res in enumerate(ranks):
        got = res["slow"]["steps"][-1]
        want = 1 - m * (t_fwd[stage] + t_bwd[stage]) / step
        assert got["wall"] == step, (stage, got)
        assert got["idle"] == pytest.approx(want, rel=EXACT), f"stage {stage}: idle {got['idle']:.4f}, not {want:.4f}"
