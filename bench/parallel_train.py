"""Tokens/s, MFU and the communication share of a gpt4-mini training step: one process x 2 threads, and 2 gloo
processes x 1 thread for DDP, ZeRO-1, FSDP2, TP, EP and PP (each schedule), and one 4-process combination, with the
planner's bytes per step (and, for pipelines, its bubble) beside the measured ones.

    python bench/parallel_train.py                              # ~4 min on 2 cores; prints one JSON object
    python bench/parallel_train.py --n-layer 2 --layouts ddp,tp2 --steps 2     # a quicker look

Every run is moekit's own trainer (`moekit.train.loop.Trainer` with a `Layout`), fp32 (no autocast, so that the
bytes tensor parallelism moves are the planner's fp32 activations), on random tokens, the same global batch for all
(--batch-tokens in sequences of --seq-len): the 2-process runs are `torchrun --standalone --nproc-per-node 2
bench/parallel_train.py --worker ...` with OMP_NUM_THREADS=1 per rank, the baseline a plain process with 2 threads.

Per run, after --warmup steps (the first builds AdamW's state; DDP rebuilds its buckets on the second):
- step_s: the median of --steps timed steps (the slowest rank's); tok_s = global batch tokens / step_s; mfu =
  tok_s x training FLOPs per token (moekit.train.metrics.train_flops_per_token: 6 x active + attention) / peak,
  the peak being the fp32 GEMM rate every rank measures at start with its own threads, summed over the ranks.
- one more step inside moekit.parallel.collectives.CollectiveCounter, which catches every collective at the
  dispatcher and waits on it at once: comm_s is the time the rank spent in communication (slowest rank),
  comm_share = comm_s / that step's time (counted_step_s; waiting removes the little overlap gloo had, so
  it is a bit longer than step_s), measured_payload the bytes per collective kind.
- planned_payload: `moekit.plan.train(..., optimizer_precision="fp32").collectives`, predicted from the
  configuration alone; planned_wire what a ring puts on one rank's link. The planner has no link figures for gloo
  on loopback, so it predicts no time here: the measured comm_s and the wire GB/s it implies stand beside the bytes;
  planned_comm_s_h100 is what the planner says the same bytes take over H100 NVLink.
- gloo_probe: this machine's gloo link measured in the same run (one 2-rank launch timing each collective kind at
  1 MB and 32 MB payloads: a per-call latency and a GB/s per kind, the way bench/train_step.py measures its GEMM
  peak beside its MFU). explained_comm_s = the planner's calls x latency + payload / GB/s per kind: how much of
  the measured comm_s the planned bytes account for; the rest is waiting for the slower rank (two ranks and
  gloo's threads share two cores) and contention with computation.
- pipelines (pp2-*, pp2-tp2): pp_idle is each stage's measured idle share of a step (moekit/parallel/pipeline.py:
  wall time minus time inside the stage's forward and backward), planned_bubble the planner's
  `pipeline_bubble(pp, m, schedule, v)`. On two shared cores the stages' compute also contends for the cores, so
  idle shares here are a lower bound of the schedule's bubble (tests/parallel/test_pipeline_bubble.py measures the
  bubble itself, with the compute made contention-free).
- ep2: measured and planned all-to-all bytes (the token exchange) beside the rest.
Gloo on two shared cores is no place to chase speed (DESIGN.md): the figures say what each layout costs here and
why (the bytes), not what it would cost on a real network.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# name -> the layout's flags: "fsdp2" is FSDP2 --zero 3 (resharded after each block's forward), "fsdp2-zero2" --zero
# 2; pipelines run --microbatches PP_MICROBATCHES (their stages need the batch to split into that many equal parts).
LAYOUTS = {
    "ddp": dict(zero=0), "zero1": dict(zero=1), "fsdp2": dict(zero=3), "fsdp2-zero2": dict(zero=2),
    "tp2": dict(tp=2), "ep2": dict(ep=2),
    "pp2-gpipe": dict(pp=2, schedule="gpipe"), "pp2-1f1b": dict(pp=2, schedule="1f1b"),
    "pp2-interleaved": dict(pp=2, schedule="interleaved-1f1b", v=2),
    "pp2-zero-bubble": dict(pp=2, schedule="zero-bubble", v=2),
    "pp2-tp2": dict(pp=2, tp=2, nproc=4),  # the 4-process combination
}
DEFAULT_LAYOUTS = "ddp,zero1,fsdp2,tp2,ep2,pp2-gpipe,pp2-1f1b,pp2-interleaved,pp2-zero-bubble,pp2-tp2"
PP_MICROBATCHES = 4


def layout_of(name: str) -> dict:
    """The layout's flags with their defaults filled in."""
    return {"zero": 0, "tp": 1, "ep": 1, "pp": 1, "schedule": "1f1b", "v": 1, "nproc": 2, **LAYOUTS[name]}


def model_config(args):
    from moekit.presets import get_preset

    cfg = get_preset(args.preset)
    return cfg.replace(n_layer=args.n_layer) if args.n_layer else cfg


PROBE_BYTES = (1 << 20, 32 << 20)
DDP_BUCKET_BYTES = 25 * 2**20  # DistributedDataParallel's bucket_cap_mb default


def probe(args) -> None:
    """Time each collective kind on this gloo link at two payloads: (latency, bandwidth) per kind, rank 0 writes."""
    import torch
    import torch.distributed as dist

    from moekit.parallel.mesh import destroy_distributed, init_distributed

    torch.set_num_threads(args.threads)
    env = init_distributed("cpu", timeout=600)
    n = env.world_size
    calls = {"all_reduce": lambda t: dist.all_reduce(t),
             "all_gather": lambda t: dist.all_gather_into_tensor(t, t[: t.numel() // n].clone()),
             "reduce_scatter": lambda t: dist.reduce_scatter_tensor(t[: t.numel() // n].clone(), t),
             "broadcast": lambda t: dist.broadcast(t, src=0),
             "all_to_all": lambda t: dist.all_to_all_single(torch.empty_like(t), t)}
    try:
        fits = {}
        for kind, call in calls.items():
            times = []
            for size in PROBE_BYTES:
                t = torch.ones(size // 4)
                best = float("inf")
                for _ in range(4):
                    dist.barrier()
                    t0 = time.perf_counter()
                    call(t)
                    best = min(best, time.perf_counter() - t0)
                times.append(best)
            (s0, s1), (t0_, t1) = PROBE_BYTES, times
            per_byte = max((t1 - t0_) / (s1 - s0), 1e-15)
            fits[kind] = {"latency_s": max(t0_ - s0 * per_byte, 0.0), "gb_s": 1e-9 / per_byte}
        if env.is_main:
            Path(args.out).write_text(json.dumps(fits))
    finally:
        destroy_distributed()


def explained_seconds(collectives, fits: dict) -> float:
    """The planner's collectives at the probed gloo rates (calls x latency + payload / bandwidth, per kind; a
    pipeline's send/recv is not probed and counts nothing)."""
    total = 0.0
    for c in collectives.collectives:
        calls = c.calls if c.calls is not None else -(-c.payload // DDP_BUCKET_BYTES)
        fit = fits.get(c.kind)
        if fit is None:
            continue
        total += calls * fit["latency_s"] + c.payload / (fit["gb_s"] * 1e9)
    return total


# ---- one run (a rank) ----------------------------------------------------------------------------------------
def worker(args) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    from moekit.model.transformer import Transformer
    from moekit.parallel.collectives import CollectiveCounter
    from moekit.parallel.mesh import ParallelDims, destroy_distributed, init_distributed
    from moekit.parallel.parallelize import Layout
    from moekit.train.config import TrainConfig
    from moekit.train.data import Mixture, PackedSource
    from moekit.train.loop import Trainer
    from moekit.train.metrics import measure_gemm_peak

    torch.set_num_threads(args.threads)
    env = init_distributed("cpu", timeout=600)
    try:
        cfg = model_config(args)
        peak = measure_gemm_peak(torch.float32, "cpu", n=1024, min_seconds=0.5)
        grad_accum = 1
        if env.world_size > 1:
            lay = layout_of(args.layout)
            dims = ParallelDims.from_flags(env.world_size, tp=lay["tp"], ep=lay["ep"], pp=lay["pp"], zero=lay["zero"],
                                           cfg=cfg)
            extra = {}
            if lay["pp"] > 1:
                from moekit.parallel.stages import PipelineConfig

                grad_accum = PP_MICROBATCHES
                extra["pipeline"] = PipelineConfig(lay["schedule"], grad_accum, lay["v"])
            layout = Layout.from_env(dims, env, **extra)
        else:
            layout = Layout.single(env.device)
        model = Transformer(cfg)
        model.init_weights(seed=0)
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 400 * args.seq_len, dtype=np.uint16)
        steps = args.warmup + args.steps + 1
        tc = TrainConfig(steps=steps, batch_tokens=args.batch_tokens, batch_tokens_start=0, warmup_steps=0,
                         dtype="fp32", device="cpu", grad_accum=grad_accum)
        run_dir = Path(args.out).parent / f"run-{env.rank}"  # the launch's temporary folder (metrics.jsonl)
        trainer = Trainer(model, tc, args.seq_len, Mixture([PackedSource("random", 1.0, tokens, args.seq_len)], 0), {},
                          torch.ones(cfg.vocab_size), str(run_dir), env.device, None, layout=layout)

        def sync():
            if env.world_size > 1:
                dist.barrier()

        for _ in range(args.warmup):
            trainer.train_step()
        times, idle = [], []
        for _ in range(args.steps):
            sync()
            t0 = time.perf_counter()
            rec = trainer.train_step()
            times.append(time.perf_counter() - t0)
            idle.append(rec.get("pp_idle"))
        sync()
        t0 = time.perf_counter()
        with CollectiveCounter() as comm:
            trainer.train_step()
        mine = {"peak": peak, "step_s": statistics.median(times), "counted_step_s": time.perf_counter() - t0,
                "comm_s": comm.seconds, "payload": comm.payload_by_kind(), "calls": comm.calls_by_kind(),
                "batch_tokens": rec["batch_tokens"], "layout": layout.describe(),
                "pp_idle": statistics.median(idle) if idle[0] is not None else None}
        ranks = [mine]
        if env.world_size > 1:
            ranks = [None] * env.world_size
            dist.all_gather_object(ranks, mine)
        if env.is_main:
            Path(args.out).write_text(json.dumps(ranks))
    finally:
        destroy_distributed()


# ---- the parent: every run, the planner, one JSON --------------------------------------------------------------
def launch(args, layout: str, procs: int, threads: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        return _launch(args, layout, procs, threads, Path(tmp) / "ranks.json")


def _launch(args, layout: str, procs: int, threads: int, out: Path) -> list[dict]:
    worker_args = [str(Path(__file__).resolve()), "--worker", "--layout", layout, "--threads", str(threads),
                   "--out", str(out), "--preset", args.preset, "--n-layer", str(args.n_layer),
                   "--batch-tokens", str(args.batch_tokens), "--seq-len", str(args.seq_len),
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if layout == "probe":
        worker_args = worker_args[:worker_args.index("--preset")]
    if procs == 1:
        cmd = [sys.executable, *worker_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
               *worker_args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{layout} ({procs} x {threads}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def planned(args, cfg, layout: str) -> dict:
    from moekit import plan
    from moekit.plan.train import pipeline_bubble

    lay = layout_of(layout)
    tp, pp, n = lay["tp"], lay["pp"], lay["nproc"]
    dp = n // (tp * pp)
    seqs = args.batch_tokens // args.seq_len
    m = PP_MICROBATCHES if pp > 1 else 1
    kw = dict(n_gpus=n, tokens=1e9, tp=tp, pp=pp, ep=lay["ep"], zero_stage=lay["zero"],
              batch_tokens=args.batch_tokens, seq_len=args.seq_len, micro_batch=seqs // dp // m, recompute="none",
              optimizer_precision="fp32", schedule=lay["schedule"], stages_per_rank=lay["v"])
    p = plan.train(cfg, "H100", **kw)
    out = {"collectives": p.collectives,
           "planned_payload": p.collectives.payload_by_kind(), "planned_wire": p.collectives.wire,
           "planned_comm_s_h100": p.comm_seconds,
           "planned_rank_bytes": {k: getattr(p.ranks, k) for k in ("weights", "gradients", "optimizer")}}
    if pp > 1:
        out["planned_bubble"] = pipeline_bubble(pp, m, lay["schedule"], lay["v"])
    return out


def summarize(ranks: list[dict], fpt: float) -> dict:
    step_s = max(r["step_s"] for r in ranks)  # the slowest rank sets the step
    counted = max(r["counted_step_s"] for r in ranks)
    comm_s = max(r["comm_s"] for r in ranks)
    peak = sum(r["peak"] for r in ranks)
    tok_s = ranks[0]["batch_tokens"] / step_s
    return {"layout": ranks[0]["layout"], "step_s": step_s, "tok_s": tok_s, "mfu": tok_s * fpt / peak,
            "gemm_peak_gflops": peak / 1e9, "counted_step_s": counted, "comm_s": comm_s,
            "comm_share": comm_s / counted, "measured_payload": ranks[0]["payload"], "calls": ranks[0]["calls"],
            "pp_idle": [r.get("pp_idle") for r in ranks] if ranks[0].get("pp_idle") is not None else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt4-mini")
    ap.add_argument("--n-layer", type=int, default=0, help="override the preset's layers (0 = the preset's)")
    ap.add_argument("--batch-tokens", type=int, default=1024, help="global batch per step (default 1024)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per run (median), after --warmup")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--layouts", default=DEFAULT_LAYOUTS, help=f"of {', '.join(LAYOUTS)} (default {DEFAULT_LAYOUTS})")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per run")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--layout", default="single", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return probe(args) if args.layout == "probe" else worker(args)

    from moekit.counts import count_params
    from moekit.plan.comm import WIRE_FACTOR
    from moekit.train.metrics import train_flops_per_token

    layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    unknown = [n for n in layouts if n not in LAYOUTS]
    if unknown:
        raise SystemExit(f"--layouts: unknown {unknown}; choose from {', '.join(LAYOUTS)}")
    cfg = model_config(args)
    fpt = train_flops_per_token(cfg, args.seq_len)
    t_start = time.perf_counter()
    fits = launch(args, "probe", 2, 1)
    base = summarize(launch(args, "single", 1, 2), fpt)
    result = {"bench": "parallel_train", "preset": args.preset, "n_layer": cfg.n_layer,
              "params_total": count_params(cfg).total, "batch_tokens": args.batch_tokens, "seq_len": args.seq_len,
              "dtype": "fp32", "backend": "gloo", "train_flops_per_token": fpt, "load_avg_1min": os.getloadavg()[0],
              "gloo_probe": fits, "baseline": {"run": "1 process x 2 threads", **base}, "runs": {}}
    for name in layouts:
        n = layout_of(name)["nproc"]
        run = summarize(launch(args, name, n, 1), fpt)
        plan = planned(args, cfg, name)
        explained = explained_seconds(plan.pop("collectives"), fits)
        wire = sum(b * WIRE_FACTOR[k](2) for k, b in run["measured_payload"].items())
        run.update(plan, run=f"{n} processes x 1 thread", tok_s_vs_baseline=run["tok_s"] / base["tok_s"],
                   payload_measured_over_planned={k: run["measured_payload"].get(k, 0) / v
                                                  for k, v in plan["planned_payload"].items()},
                   gloo_wire_gb_s=wire / run["comm_s"] / 1e9 if run["comm_s"] else None,
                   explained_comm_s=explained, explained_share=explained / run["comm_s"] if run["comm_s"] else None)
        result["runs"][name] = run
    result["seconds"] = time.perf_counter() - t_start
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
