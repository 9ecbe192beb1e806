"""`moekit sim`: simulate serving traffic on a deployment, with the engine's own scheduler on a simulated clock.

    moekit sim --model gpt4 --gpu A100-40GB --tp 8 --pp 16 --replicas 1 --rate 4 --duration 3600
    moekit sim --trace conv --time-scale 2 --slo ttft:2000,tpot:300 --chart sim.png   # the Azure trace, 2x faster
    moekit sim --rate 1,2,4,8 --duration 600 --chart load.png        # latency and cost against load
    moekit sim --daily --rate 8 --duration 86400 --chart day.png     # a day's load curve peaking at 8 req/s
    moekit sim --capacity --slo ttft:2000,tpot:300 --traffic 40      # max rate per replica, replicas for 40 req/s
    moekit sim --profile cpu.json --num-blocks 2048 --rate 4          # a profile measured by `moekit sim calibrate`
    moekit sim calibrate --model runs/tiny --out cpu.json             # measure this machine's engine
    moekit sim replay --step-log steps.jsonl --profile cpu.json       # the server's arrivals, the simulator's batches

Step times come from the planner's hardware table (any GPU of `moekit plan serve`; the same roofline) or from a
measured profile. Figures are `moekit bench serve`'s (TTFT, TPOT, ITL, E2E; throughput; goodput under --slo),
plus utilization, KV occupancy, preemptions, experts touched and $ per 1k tokens at the simulated utilization.
Bad input (a rate of 0, an SLO that does not parse, a trace with a bad row, a deployment that does not fit):
one line, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from moekit.plan.hardware import DTYPE_BYTES
from moekit.sim.metrics import parse_slo
from moekit.sim.router import ROUTERS


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--rate {text!r}: give requests per second, or a list like 1,2,4") from None
    if not all(r > 0 and math.isfinite(r) for r in rates):
        raise ValueError(f"--rate {text!r}: a rate must be > 0 requests per second")
    return rates


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("deployment")
    d.add_argument("--model", default="gpt4", help="preset, moekit run or HF folder (default gpt4)")
    d.add_argument("--gpu", default="A100-40GB", help="a GPU of the hardware table (default A100-40GB)")
    d.add_argument("--hardware", action="append", default=[], metavar="FILE", help="extra hardware entries")
    d.add_argument("--tp", type=int, default=8, help="tensor-parallel degree (default 8)")
    d.add_argument("--pp", type=int, default=16, help="pipeline stages (default 16)")
    d.add_argument("--ep", type=int, default=1, help="expert-parallel degree (default 1)")
    d.add_argument("--weight-dtype", default="bf16", choices=list(DTYPE_BYTES))
    d.add_argument("--kv-dtype", default="bf16", choices=list(DTYPE_BYTES))
    d.add_argument("--memory-fraction", type=float, default=0.9, help="HBM share for weights + KV (default 0.9)")
    d.add_argument("--replicas", type=int, default=1, help="replicas behind the router (default 1)")
    d.add_argument("--router", default="least-loaded", choices=ROUTERS)
    d.add_argument("--routing", metavar="RUN", help="expert loads measured in a trained moekit run (metrics.jsonl) "
                                                    "instead of uniform routing")
    d.add_argument("--profile", metavar="FILE", help="step times from `moekit sim calibrate` instead of a GPU")
    d.add_argument("--price-per-hour", type=float, help="$ per GPU-hour (default: the hardware table's)")
    e = p.add_argument_group("engine (the scheduler's settings, as `moekit serve` takes them)")
    e.add_argument("--max-num-seqs", type=int, default=1024, help="requests running at once (default 1024)")
    e.add_argument("--max-num-batched-tokens", type=int, default=8192, help="token budget per step (default 8192)")
    e.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens (default: the model's)")
    e.add_argument("--block-size", type=int, default=16)
    e.add_argument("--num-blocks", type=int, help="KV blocks per replica (default: what the GPUs' memory holds)")
    e.add_argument("--no-prefix-caching", action="store_true")
    w = p.add_argument_group("workload")
    w.add_argument("--rate", default="2", help="requests/s (Poisson; a list sweeps; the peak with --daily)")
    w.add_argument("--duration", type=float, default=600.0, help="seconds of arrivals (default 600)")
    w.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1 = Poisson)")
    w.add_argument("--daily", action="store_true", help="the rate follows a day's curve (peak --rate, trough 25%%)")
    w.add_argument("--prompt-len", default="lognormal:1024:1.0",
                   help="a length spec: 512, uniform:16:512, lognormal:MEAN:SIGMA (default lognormal:1024:1.0)")
    w.add_argument("--output-len", default="lognormal:256:1.0", help="a length spec (default lognormal:256:1.0)")
    w.add_argument("--shared-prefix-len", type=int, default=0, help="tokens of a shared system prompt")
    w.add_argument("--num-prefixes", type=int, default=1, help="distinct shared prompts (default 1)")
    w.add_argument("--trace", metavar="FILE|conv|code", help="replay an Azure trace (CSV) or a bench-serve detail "
                                                             "JSONL; conv/code: the shipped Azure 2023 hours")
    w.add_argument("--trace-start", type=float, default=0.0, help="seconds into the trace (default 0)")
    w.add_argument("--trace-duration", type=float, help="seconds of the trace (default: all)")
    w.add_argument("--time-scale", type=float, default=1.0, help="trace speed-up: 2 = arrivals twice as often")
    w.add_argument("--seed", type=int, default=0)
    o = p.add_argument_group("output")
    o.add_argument("--slo", help="SLOs for goodput, ms: ttft:2000,tpot:300")
    o.add_argument("--capacity", action="store_true", help="search the largest rate per replica meeting --slo")
    o.add_argument("--attainment", type=float, default=0.9, help="--capacity: share of requests meeting the SLOs")
    o.add_argument("--traffic", type=float, help="--capacity: requests/s to serve; prints the replicas needed")
    o.add_argument("--json", action="store_true", help="print the full result as JSON")
    o.add_argument("--out", help="write the JSON here")
    o.add_argument("--chart", help="PNG: latency and cost against load (a --rate list) or load over time")
    sub = p.add_subparsers(dest="sim_command", metavar="{calibrate,replay}")
    from moekit.sim import calibrate, replay

    calibrate.add_arguments(sub.add_parser("calibrate", help="measure this machine's engine: a step-time profile"))
    replay.add_arguments(sub.add_parser("replay", help="replay a server's step log: the same batches?"))


# ---- building the pieces ------------------------------------------------------------------------------
def step_model(args, seed: int = 0):
    from moekit.sim import steptime

    if args.profile:
        from moekit.sim.profile import StepProfile

        return steptime.ProfileModel(StepProfile.load(args.profile), seed=seed)
    routing = steptime.load_routing(args.routing) if args.routing else None
    return steptime.HardwareModel(args.model, args.gpu, tp=args.tp, pp=args.pp, ep=args.ep,
                                  weight_dtype=args.weight_dtype, kv_dtype=args.kv_dtype,
                                  memory_fraction=args.memory_fraction, routing=routing, seed=seed,
                                  hardware_files=tuple(args.hardware))


def deployment(args, model):
    from moekit.sim.simulator import Deployment

    if args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    cfg = getattr(model, "cfg", None)
    max_len = args.max_model_len or (cfg.max_seq_len if cfg is not None else 2048)
    if args.num_blocks is not None:
        num_blocks = args.num_blocks
    elif args.profile:  # the pool of the engine it measured
        num_blocks = model.profile.engine.get("num_blocks")
        if not num_blocks:
            raise ValueError("--profile holds no engine settings: give --num-blocks (the server's KV blocks)")
    else:
        num_blocks = model.kv_tokens_capacity() // args.block_size  # raises, by how much, if it does not fit
    return Deployment(replicas=args.replicas, num_blocks=num_blocks, block_size=args.block_size,
                      max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                      max_model_len=max_len, enable_prefix_caching=not args.no_prefix_caching, router=args.router)


def make_workload(args, rate: float):
    from moekit.sim import workload as wl

    if args.trace:
        path = wl.builtin_trace(args.trace) if args.trace in ("conv", "code") else args.trace
        return wl.load_trace(path, start=args.trace_start, duration=args.trace_duration, time_scale=args.time_scale)
    if not args.duration > 0:
        raise ValueError(f"--duration must be > 0 seconds, got {args.duration}")
    if args.daily:
        import random

        times = wl.daily_curve(rate, time_scale=86400 / args.duration, seed=args.seed)  # the day in --duration s
        rng = random.Random(args.seed)
        ins = wl.parse_lengths(args.prompt_len).sample(len(times), rng)
        outs = wl.parse_lengths(args.output_len).sample(len(times), rng)
        k = args.shared_prefix_len
        return [wl.SimRequest(t, max(n, k + 1), o, i % args.num_prefixes if k else -1, k)
                for i, (t, n, o) in enumerate(zip(times, ins, outs, strict=True))]
    return wl.synthetic(rate, args.duration, args.prompt_len, args.output_len, burstiness=args.burstiness,
                        shared_prefix_len=args.shared_prefix_len, num_prefixes=args.num_prefixes, seed=args.seed)


def run_once(args, rate: float, slos: dict, replicas: int | None = None, requests=None) -> tuple[dict, object]:
    from moekit.sim.metrics import timeline
    from moekit.sim.simulator import simulate

    model = step_model(args, args.seed)
    dep = deployment(args, model)
    if replicas is not None:
        dep.replicas = replicas
    reqs = requests if requests is not None else make_workload(args, rate)
    if not len(reqs):
        raise ValueError("the workload has no request: raise --rate or --duration, or check --trace-start")
    hw = getattr(model, "hw", None)
    price = args.price_per_hour if args.price_per_hour is not None else (hw.price_per_hour if hw else None)
    run = simulate(reqs, lambda i: model, dep, seed=args.seed,
                   vocab=model.cfg.vocab_size if getattr(model, "cfg", None) else 50_000,
                   bin_s=max(1.0, (reqs[-1].arrival if len(reqs) else 1.0) / 96))
    s = run.summary(slos, price_per_gpu_hour=price,
                    peak_flops=hw.peak_flops(args.weight_dtype if args.weight_dtype in ("fp8",) else "bf16")
                    if hw else None, peak_bandwidth=hw.bandwidth if hw else None)
    s["offered_rate"] = len(reqs) / max(reqs[-1].arrival, 1e-9) if len(reqs) > 1 else rate
    s["sim"]["timeline"] = timeline(run)
    return s, run


def _line(s: dict) -> str:
    sim = s["sim"]
    cost = f" | ${sim['cost_per_1k_output']:.4f}/1k out" if "cost_per_1k_output" in sim else ""
    good = f" | goodput {s['request_goodput']:.2f} req/s ({s['slo_attainment']:.0%})" if "request_goodput" in s else ""
    return (f"rate {s['offered_rate']:.2f} req/s | {s['completed']:,} done | TTFT p50 {s['median_ttft_ms']:.0f} "
            f"p90 {s['p90_ttft_ms']:.0f} ms | TPOT p50 {s['median_tpot_ms']:.1f} p90 {s['p90_tpot_ms']:.1f} ms | "
            f"{s['output_throughput']:,.0f} out tok/s | batch {sim['mean_batch_seqs']:.0f} x {sim['replicas']} | "
            f"busy {sim['busy']:.0%} | KV peak {sim['kv_occupancy_peak']:.0%} | preempted {sim['preemptions']:,}"
            f"{good}{cost} | {sim['sim_requests_per_wall_s']:,.0f} sim req/wall-s")


def capacity(args, slos: dict) -> dict:
    """The largest Poisson rate one replica serves with `attainment` of requests meeting every SLO (bisection on
    the rate; attainment falls as the rate rises), then the replicas `--traffic` needs, checked by simulating them."""
    if not slos:
        raise ValueError("--capacity needs --slo, e.g. --slo ttft:2000,tpot:300")
    if not 0 < args.attainment <= 1:
        raise ValueError(f"--attainment must be in (0, 1], got {args.attainment}")

    def ok(rate: float) -> tuple[bool, dict]:
        s, _ = run_once(args, rate, slos, replicas=1)
        return s["slo_attainment"] >= args.attainment, s

    lo, hi = 0.0, _rates(args.rate)[0]
    while True:  # grow until it fails
        good, s = ok(hi)
        if not good:
            break
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError("the SLOs hold at any rate: the workload is too short to load the replica")
    trials = []
    for _ in range(8):
        mid = (lo + hi) / 2
        good, s = ok(mid)
        trials.append({"rate": mid, "attainment": s["slo_attainment"]})
        lo, hi = (mid, hi) if good else (lo, mid)
    if lo == 0:
        raise ValueError(f"no rate meets the SLOs on one replica (at {hi:.3g} req/s {s['slo_attainment']:.0%} "
                         "meet them): relax --slo or use more GPUs per replica")
    out = {"slo": slos, "attainment": args.attainment, "max_rate_per_replica": lo, "trials": trials}
    if args.traffic:
        need = math.ceil(args.traffic / lo)
        fleet, _ = run_once(args, args.traffic, slos, replicas=need)
        out |= {"traffic": args.traffic, "replicas_needed": need, "fleet": fleet}
    return out


def run(args: argparse.Namespace) -> int:
    if args.sim_command == "calibrate":
        from moekit.sim import calibrate

        return calibrate.run(args)
    if args.sim_command == "replay":
        from moekit.sim import replay

        return replay.run(args)
    slos = parse_slo(args.slo)
    rates = _rates(args.rate)
    if not args.burstiness > 0:
        raise ValueError(f"--burstiness must be > 0, got {args.burstiness}")
    if args.capacity:
        result = capacity(args, slos)
        print(f"max rate per replica meeting {args.slo} for {args.attainment:.0%}: "
              f"{result['max_rate_per_replica']:.3g} req/s", file=sys.stderr)
        if "replicas_needed" in result:
            print(f"{args.traffic:g} req/s needs {result['replicas_needed']} replicas: {_line(result['fleet'])}",
                  file=sys.stderr)
    else:
        runs = []
        for rate in rates if not args.trace else rates[:1]:
            s, _ = run_once(args, rate, slos)
            print(_line(s), file=sys.stderr)
            runs.append(s)
        result = runs[0] if len(runs) == 1 else {"runs": runs}
        if args.chart:
            from moekit.sim.charts import load_chart, timeline_chart

            (load_chart if len(runs) > 1 else timeline_chart)(runs, args.chart)
            print(f"wrote {args.chart}", file=sys.stderr)
    text = json.dumps(result, indent=1)
    if args.json:
        print(text)
    if args.out:
        from moekit.util import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    return 0
