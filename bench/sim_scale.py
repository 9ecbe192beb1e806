"""How fast the simulator runs GPT-4 at cluster scale: one simulated hour, one replica and a fleet.

    OMP_NUM_THREADS=1 python bench/sim_scale.py                     # 1 replica, then 10, one simulated hour each
    OMP_NUM_THREADS=1 python bench/sim_scale.py --replicas 1 --hours 0.25

The workload is the shipped Azure conversation trace (real arrival bursts and lengths), sped up `--time-scale`
times per replica (3: ~15 requests/s, which keeps ~2,000-3,000 sequences in flight on GPT-4 over 128 A100-80GB,
8 x 16) and laid end to end until it covers `--hours` of simulated time; a fleet of R replicas gets R times the
arrivals (the trace sped up R x more), behind the least-loaded router. Each run is timed on its own (wall seconds
of `simulate` only; `summary_wall_s` is the metrics afterwards); printed as JSON with simulated requests, scheduled
tokens and request-steps (one request in one micro-batch: the unit of the simulator's work) per wall-second. The
baseline is the simulated time itself: `speedup` = simulated seconds / wall seconds (> 1: faster than the cluster).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from moekit.sim import steptime
from moekit.sim import workload as wl
from moekit.sim.simulator import Deployment, simulate
from moekit.sim.workload import SimRequest


def tiled_trace(name: str, time_scale: float, seconds: float) -> list[SimRequest]:
    """The trace at `time_scale`, repeated end to end until `seconds` of arrivals."""
    one = wl.load_trace(wl.builtin_trace(name), time_scale=time_scale)
    period = 3600.0 / time_scale  # the shipped traces are one hour each
    out, k = [], 0
    while k * period < seconds:
        out += [SimRequest(r.arrival + k * period, r.prompt_len, r.output_len) for r in one
                if r.arrival + k * period < seconds]
        k += 1
    return out


def run(replicas: int, args) -> dict:
    model = steptime.HardwareModel("gpt4", args.gpu, tp=8, pp=16, seed=0)
    reqs = tiled_trace(args.trace, args.time_scale * replicas, args.hours * 3600)
    dep = Deployment(replicas=replicas, num_blocks=model.kv_tokens_capacity() // 16, max_num_seqs=args.max_num_seqs,
                     max_model_len=8192)
    sim = simulate(reqs, lambda i: model, dep, vocab=model.cfg.vocab_size,
                   progress=lambda i: print(f"  {i:,} requests routed", file=sys.stderr) if i % 20_000 == 0 else None)
    t0 = time.perf_counter()
    s = sim.summary(price_per_gpu_hour=model.hw.price_per_hour)
    summary_s = time.perf_counter() - t0
    tokens = sum(r.tokens for r in sim.replicas)
    request_steps = sum(r.batch_seqs for r in sim.replicas)  # one request in one micro-batch
    return {"replicas": replicas, "requests": len(reqs), "simulated_s": s["duration"], "wall_s": sim.wall_s,
            "summary_wall_s": summary_s, "sim_requests_per_wall_s": len(reqs) / sim.wall_s,
            "scheduled_tokens": tokens, "scheduled_tokens_per_wall_s": tokens / sim.wall_s,
            "request_steps": request_steps, "wall_us_per_request_step": sim.wall_s / request_steps * 1e6,
            "micro_batches": s["sim"]["steps"],
            "speedup": s["duration"] / sim.wall_s,
            "mean_batch_seqs": s["sim"]["mean_batch_seqs"], "in_flight_mean": s["sim"]["mean_batch_seqs"] * 16,
            "busy": s["sim"]["busy"], "output_throughput": s["output_throughput"],
            "median_tpot_ms": s["median_tpot_ms"], "median_ttft_ms": s["median_ttft_ms"],
            "preemptions": s["sim"]["preemptions"], "cost_per_1k_output": s["sim"].get("cost_per_1k_output")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", default="1,10", help="fleet sizes to time (default 1,10)")
    p.add_argument("--hours", type=float, default=1.0, help="simulated hours (default 1)")
    p.add_argument("--time-scale", type=float, default=3.0, help="trace speed-up per replica (default 3)")
    p.add_argument("--trace", default="conv", choices=["conv", "code"])
    p.add_argument("--gpu", default="A100-80GB")
    p.add_argument("--max-num-seqs", type=int, default=8192)
    args = p.parse_args()
    out = []
    for r in (int(x) for x in args.replicas.split(",")):
        out.append(run(r, args))
        print(json.dumps(out[-1]), file=sys.stderr)
    print(json.dumps({"hours": args.hours, "time_scale": args.time_scale, "runs": out}, indent=1))


if __name__ == "__main__":
    main()
