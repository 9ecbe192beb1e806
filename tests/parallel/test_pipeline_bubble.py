"""The pipeline bubble, measured (issue 11, build point 4): 4 stages on 4 gloo ranks, M = 4, 8, 16 micro-batches.

    .venv/bin/python -m pytest tests/parallel/test_pipeline_bubble.py -q -s     # one 4-rank launch, ~50 s

What is measured is production code: each stage's idle fraction of a step as `Pipeline.times` reports it (wall time
of `Pipeline.step`, up to the pipeline flush, minus the time inside the stage's forward/backward calls), the figure
the trainer writes as `pp_idle` to metrics.jsonl. It is compared with the planner's `pipeline_bubble(p, m, schedule,
v)` (moekit/plan/train.py).

Contention: 4 processes (OMP_NUM_THREADS=1, one thread each) on 2 cores cannot compute side by side, so the compute
of a stage is a fixed modelled "device time" that costs no CPU (pp_bubble_worker.py: every compute call does its
small real work, then sleeps until F = 60 ms per forward of a micro-batch on a rank, 2F per backward, has passed).
gloo's receive does not busy-wait (a rank blocked 0.3 s in recv uses ~1 ms of CPU: checked below), so waiting
stages do not take the cores from computing ones; the 4 ranks together use well under one core (checked below).

What is compared, and why each stage. Narayanan et al. 2021 (section 2.2.1) count the bubble per device of a
pipeline with a synchronous flush: every device waits (p - 1) (t_f + t_b) of a step whose length is (m + p - 1)
(t_f + t_b), i.e. the same idle share (p - 1) / (m + p - 1) on the first stage as on the last; the first stage waits
at the end (for the backwards to come back), the last at the start. The measurement matches that definition only
when a stage's step ends at the flush: without it the last stage, done (p - 1) t_b earlier than the first, read
0.24 at M = 4 against the first stage's 0.46 (formula 0.43). `Pipeline.step` now ends with a barrier over the
pipeline ranks (the trainer's next collective would wait for it anyway), and every stage is held to the formula.

What is not modelled by the formula, and shows: per hop, the host's overhead (torch's schedule in Python, gloo's
send and receive, a woken process waiting for a core while other jobs share the machine), o ~ 1-3 ms on the
critical path 2 (m + p - 1) times per step, so the measured bubble exceeds the formula by ~2 (m + p - 1) o and the
excess grows with M: 1F1B measured 1.03 / 1.06 / 1.16 x the formula at M = 4 / 8 / 16 (GPipe 1.04 / 1.05 / 1.14).
F = 60 ms keeps that inside 25%; at F = 15 ms it was 1.3 x at M = 16, independent of F in absolute terms (the
excess is the overhead, not the schedule).

- GPipe and 1F1B: (p - 1) / (m + p - 1), each stage within 25% (the acceptance).
- Interleaved 1F1B, V = 2: (p - 1) / (V m + p - 1). Twice the hops, each half as long, so the same overhead weighs
  twice as much: measured 1.14-1.21 x. Held to 25% below and 50% above, and below 1F1B's measured bubble.
- ZB-V zero-bubble, V = 2, t_f = t_b = t_w: the planner says 0 (Qi et al. 2024, its ideal); torch's ZB-V leaves the
  ramp's first forwards unfilled (~(p - 1) chunk forwards) plus the overhead: measured 0.22 / 0.09 / 0.07-0.11. A
  ratio to 0 means nothing; it is reported, and held below 1F1B's bubble.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs gloo")

import pp_bubble_worker as worker  # noqa: E402  (beside this file; pytest puts tests/parallel on sys.path)
from spawn import spawn_ranks  # noqa: E402

from moekit.plan.train import pipeline_bubble  # noqa: E402

TOL = 0.25


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return spawn_ranks(worker.run, worker.PP, tmp_path_factory.mktemp("bubble"))


def measured(ranks, name: str, m: int) -> list[float]:
    """Each stage's (rank's) idle fraction, averaged over the measured steps."""
    out = []
    for res in ranks:
        steps = res["cases"][f"{name}_m{m}"]["steps"]
        out.append(sum(s["idle"] for s in steps) / len(steps))
    return out


def formula(name: str, m: int) -> float:
    schedule, v = worker.SCHEDULES[name]
    return pipeline_bubble(worker.PP, m, schedule, v)


def test_report(ranks):
    """The table (pytest -s prints it): measured idle per stage, the planner's figure, their ratio."""
    print(f"\n{'schedule':18s} {'M':>3s} {'formula':>8s}  measured idle per stage        mean   ratio")
    for name in worker.SCHEDULES:
        for m in worker.MS:
            got, want = measured(ranks, name, m), formula(name, m)
            mean = sum(got) / len(got)
            ratio = f"{mean / want:6.2f}" if want > 1e-9 else "   n/a"
            print(f"{name:18s} {m:3d} {want:8.3f}  {' '.join(f'{g:.3f}' for g in got)}  {mean:.3f} {ratio}")


def test_gloo_receive_does_not_spin(ranks):
    for res in ranks:
        for how, t in res["spin"].items():
            assert t["wall_s"] > 0.25, (how, t)
            assert t["cpu_s"] < 0.1 * t["wall_s"], f"gloo {how} used {t['cpu_s']:.3f} CPU s of {t['wall_s']:.3f} s"


def test_the_ranks_do_not_compete_for_the_cores(ranks):
    """Together the 4 ranks use under one of the 2 cores in every step, and the real work fits the modelled time."""
    for case in ranks[0]["cases"]:
        for k in range(len(ranks[0]["cases"][case]["steps"])):
            steps = [res["cases"][case]["steps"][k] for res in ranks]
            cores = sum(s["cpu_s"] for s in steps) / max(s["wall_s"] for s in steps)
            assert cores < 1.0, f"{case}: the 4 ranks used {cores:.2f} cores"
        for res in ranks:
            c = res["cases"][case]
            compute = sum(s["compute_s"] for s in c["steps"])
            assert c["overrun_s"] < 0.02 * compute, f"{case}: real work overran the device time by {c['overrun_s']}"


@pytest.mark.parametrize("name", ["1f1b", "gpipe"])
@pytest.mark.parametrize("m", worker.MS)
def test_measured_bubble_is_the_formulas(ranks, name, m):
    """Every stage's measured idle share is within 25% of (p - 1) / (m + p - 1)."""
    want = formula(name, m)
    assert want == pytest.approx(3 / (m + 3))
    got = measured(ranks, name, m)
    for stage, g in enumerate(got):
        assert abs(g / want - 1) <= TOL, f"{name} M={m} stage {stage}: measured {g:.3f}, formula {want:.3f}"


@pytest.mark.parametrize("m", worker.MS)
def test_interleaving_and_zero_bubble_shrink_it(ranks, m):
    inter, one = measured(ranks, "interleaved-1f1b", m), measured(ranks, "1f1b", m)
    want = formula("interleaved-1f1b", m)
    for stage, g in enumerate(inter):
        assert 1 - TOL <= g / want <= 1.5, f"interleaved M={m} stage {stage}: measured {g:.3f}, formula {want:.3f}"
    assert sum(inter) < sum(one), (inter, one)
    zb = measured(ranks, "zero-bubble", m)
    assert formula("zero-bubble", m) == pytest.approx(0.0, abs=1e-12)  # (1 - 1/3) / 2 + ... - 2/3: float residue
    assert sum(zb) < sum(one), (zb, one)
