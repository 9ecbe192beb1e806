"""`moekit sim calibrate`: measure moekit's engine on this machine and fit a step-time profile for the simulator.

    moekit sim calibrate --model runs/tiny --out cpu.json                      # the engine as `moekit serve` builds it
    moekit sim calibrate --model runs/tiny --out cpu.json --step-log steps.jsonl   # ... and its step log, to replay
    moekit sim --profile cpu.json --num-blocks N --rate 4 --duration 60

The sweep drives a real Engine (`build_engine`, the serving flags) through waves of requests: batches of 1 to
max_num_seqs, prompts from a few tokens to a long chunk, so that its steps cover decode batches, prefill chunks and
mixtures of both; every step is timed and its batch recorded where the scheduler made it. The profile is the
non-negative relative-error fit of moekit/sim/profile.py. The serving loop's own time between steps (HTTP, output
streaming) is not part of an in-process step: the profile's gap is left at 0 here.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

from moekit.sim.profile import STEP_TERMS, StepProfile, batch_features, fit


def add_arguments(p: argparse.ArgumentParser) -> None:
    from moekit.infer.build import add_engine_arguments

    p.add_argument("--model", required=True, help="a moekit run or a Hugging Face folder (as moekit serve takes)")
    p.add_argument("--out", required=True, help="the profile JSON to write")
    p.add_argument("--step-log", help="also write the sweep's step log (JSONL) here, for `moekit sim replay`")
    p.add_argument("--waves", type=int, default=3, help="passes over the batch x prompt grid (default 3)")
    p.add_argument("--output-len", type=int, default=16, help="tokens each calibration request decodes (default 16)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    add_engine_arguments(p)


def _record(engine, log: list) -> None:
    """Record every micro-batch where the scheduler makes it: (id, tokens, computed before, n_spec, logits)."""
    schedule = engine.scheduler.schedule

    def recorded(*a, **k):
        out = schedule(*a, **k)
        log.append(([(s.request.request_id, s.num_tokens, s.request.num_computed_tokens, len(s.spec_token_ids),
                      len(s.spec_token_ids) + 1 if s.reaches_end else 0) for s in out.scheduled],
                    [r.request_id for r in out.preempted]))
        return out

    engine.scheduler.schedule = recorded


def sweep(engine, *, waves: int = 3, output_len: int = 16, seed: int = 0, progress=None) -> list[dict]:
    """Run the calibration waves; one record per step: t_loop, t0, t1, added, scheduled, preempted."""
    from moekit.infer.sampler import SamplingParams

    rng = random.Random(seed)
    cfg = engine.scheduler.config
    max_prompt = max(1, min(cfg.max_num_batched_tokens * 2, engine.max_model_len - output_len - 1))
    prompts = sorted({p for p in (4, 32, 128, 512, 2048) if p <= max_prompt} | {max_prompt})
    batches = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= cfg.max_num_seqs]
    vocab = engine.cfg.vocab_size
    sched_log: list = []
    _record(engine, sched_log)
    records, n = [], 0
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    grid = [(b, p) for _ in range(waves) for b in batches for p in prompts]
    t_start = time.perf_counter()
    for i, (b, p) in enumerate(grid):
        if b * (p + output_len) > engine.kv.num_blocks * engine.kv.block_size:
            continue  # more than the pool holds: preemption storms, not step shapes
        t_loop = time.perf_counter() - t_start
        added = []
        for _ in range(b):
            rid = f"cal-{n}"
            n += 1
            engine.add_request([rng.randrange(vocab) for _ in range(p)], params, rid)
            added.append([rid, p, output_len])
        while engine.has_unfinished():
            t0 = time.perf_counter()
            before = len(sched_log)
            engine.step()
            t1 = time.perf_counter()
            for sched, pre in sched_log[before:]:
                records.append({"t_loop": (t_loop if added else t0 - t_start), "t0": t0 - t_start,
                                "t1": t1 - t_start, "added": added, "scheduled": sched, "preempted": pre})
            added = []
            for rid in list(engine.finished):
                engine.result(rid)
        if progress:
            progress(i + 1, len(grid))
    return records


def profile_from_records(records: list[dict], **meta) -> StepProfile:
    rows = [batch_features(r["scheduled"]) for r in records if r["scheduled"]]
    secs = [r["t1"] - r["t0"] for r in records if r["scheduled"]]
    # The first steps of a fresh engine run cold (allocator, caches): the first 5% are left out of the fit.
    skip = len(rows) // 20
    coef, stats = fit(rows[skip:], secs[skip:], STEP_TERMS)
    return StepProfile(step=coef, fit=stats, **meta)


def run(args: argparse.Namespace) -> int:
    import torch

    from moekit.infer.build import EngineConfig, build_engine

    if args.waves < 1 or args.output_len < 1:
        raise ValueError("--waves and --output-len must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    ecfg = EngineConfig.from_args(args)
    if ecfg.sharded:
        raise ValueError("calibrate measures one process: drop --tp/--pp/--ep")
    engine = build_engine(ecfg, progress=lambda *a: print(*a, file=sys.stderr))
    engine.generate([[1, 2, 3]] * 2, None)  # warm-up
    records = sweep(engine, waves=args.waves, output_len=args.output_len,
                    progress=lambda i, n: print(f"\rcalibrating {i}/{n}", end="", file=sys.stderr))
    print(file=sys.stderr)
    kv, sc = engine.kv, engine.scheduler.config
    prof = profile_from_records(
        records, model=str(args.model), device=str(engine.device), threads=torch.get_num_threads(), source="sweep",
        engine={"num_blocks": kv.num_blocks, "block_size": kv.block_size, "max_num_seqs": sc.max_num_seqs,
                "max_num_batched_tokens": sc.max_num_batched_tokens, "max_model_len": sc.max_model_len,
                "enable_prefix_caching": kv.enable_caching})
    prof.save(args.out)
    if args.step_log:
        from moekit.util import atomic_write_text

        atomic_write_text(args.step_log, "".join(json.dumps(r) + "\n" for r in records))
    us = ", ".join(f"{k} {v * 1e6:.3g}" for k, v in prof.step.items())
    print(f"step = {us} (us); {prof.fit['samples']} steps, median error {prof.fit['median_rel_err']:.1%}, "
          f"p90 {prof.fit['p90_rel_err']:.1%}; wrote {args.out}", file=sys.stderr)
    return 0
