"""The pipeline bubble of 4 stages, measured against the planner: one JSON object on stdout.

    python bench/pipeline_bubble.py                                  # ~40 s on 2 cores: every schedule, M = 4, 8, 16
    python bench/pipeline_bubble.py --schedules 1f1b --f-ms 30       # a quicker look
    python bench/pipeline_bubble.py --clock virtual                  # the test's deterministic figures, ~20 s

Runs tests/parallel/pp_bubble_worker.py (4 gloo ranks, one thread each; every stage's compute a fixed modelled
device time of F per forward, 2F per backward) and, per schedule and M, prints each stage's idle share as
`Pipeline.times` measured it (the trainer's pp_idle), the planner's `pipeline_bubble(4, M, schedule, V)`, and their
ratio (mean over stages / formula; none where the planner predicts 0). Two clocks (see the worker):

- wall (default): the calls sleep out their device time (costs no CPU: see the worker for how contention is
  handled) and the Pipeline reads wall time. `excess_idle_ms` is the idle time beyond the formula's: the host's
  per-hop overhead, which the formula does not count.
- virtual: the Pipeline reads the worker's modelled device clock (what tests/parallel/test_pipeline_bubble.py
  checks): the schedules on ideal devices, F = 1; `excess_idle_f` is the idle beyond the formula's in units of F.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "parallel"))
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--f-ms", type=float, default=60.0, help="modelled forward per micro-batch on a rank (ms)")
    ap.add_argument("--schedules", default="gpipe,1f1b,interleaved-1f1b,zero-bubble")
    ap.add_argument("--clock", choices=("wall", "virtual"), default="wall")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["PP_BUBBLE_CLOCK"] = args.clock
    os.environ["PP_BUBBLE_F"] = str(args.f_ms / 1000)  # read by the spawned ranks when they import the worker
    os.environ["PP_BUBBLE_SCHEDULES"] = args.schedules

    import pp_bubble_worker as worker
    import torch.multiprocessing as mp

    from moekit.plan.train import pipeline_bubble

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker.run, args=(worker.PP, str(Path(tmp, "init")), tmp), nprocs=worker.PP,
                           start_method="spawn")
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(worker.PP)]
    for r, res in enumerate(ranks):
        if res["error"]:
            raise SystemExit(f"rank {r} failed:\n{res['error']}")
    wall_clock, rows = args.clock == "wall", []
    for case in ranks[0]["cases"]:
        name, m = case.rsplit("_m", 1)
        schedule, v = worker.SCHEDULES[name]
        want = pipeline_bubble(worker.PP, int(m), schedule, v)
        runs = [res["cases"][case] for res in ranks]
        idle = [sum(s["idle"] for s in c["steps"]) / len(c["steps"]) for c in runs]
        wall = max(sum(s["wall"] for s in c["steps"]) / len(c["steps"]) for c in runs)
        compute = sum(sum(s["compute"] for s in c["steps"]) / len(c["steps"]) for c in runs) / len(runs)
        cpu = sum(sum(s["cpu_s"] for s in c["steps"]) / len(c["steps"]) for c in runs)
        mean = sum(idle) / len(idle)
        excess = wall - compute - compute * want / (1 - want)  # idle beyond the formula's, per stage on average
        row = {"schedule": name, "stages_per_rank": v, "microbatches": int(m), "planned_bubble": want,
               "measured_idle_per_stage": [round(x, 4) for x in idle], "measured_idle_mean": round(mean, 4),
               "ratio": round(mean / want, 3) if want > 1e-9 else None,
               "max_stage_ratio": round(max(idle) / want, 3) if want > 1e-9 else None}
        if wall_clock:
            row.update(step_s=round(wall, 4), excess_idle_ms=round(1000 * excess, 1),
                       cpu_cores_used=round(cpu / wall, 3),  # the 4 ranks together, of the 2 cores
                       overruns=sum(c["overruns"] for c in runs))
        else:
            row.update(step_f=wall, excess_idle_f=round(excess, 4))
        rows.append(row)
    out = {"stages": worker.PP, "clock": args.clock, "rows": rows}
    if wall_clock:
        out.update(f_ms=args.f_ms, gloo_recv_spin=[res["spin"] for res in ranks[1::2]])
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
