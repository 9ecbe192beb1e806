"""`moekit sim calibrate`: measure moekit's engine on this machine and fit a step-time profile for the simulator.

    moekit sim calibrate --model runs/tiny --out cpu.json                    # the engine as `moekit serve` builds it
    moekit sim calibrate --model gpt4-mini --out cpu.json --max-num-seqs 64  # a preset, random weights
    moekit sim calibrate --model runs/tiny --out cpu.json --step-log sweep.jsonl   # ... and the sweep's step log
    moekit sim calibrate --from-step-log steps.jsonl --out server.json      # from `moekit serve --step-log`
    moekit sim --profile cpu.json --rate 4 --duration 60

Two sources:
- The sweep (default) drives a real Engine, built with the serving flags (`build_engine`, or a preset with random
  weights: step time does not depend on their values), through cells of (batch b, prompt p): b / 2 requests
  arrive, and once they decode the other half join, so the steps cover prefill chunks, chunked prefill mixed with
  decodes, and decode batches of 1 to max_num_seqs at short and long contexts. Every step is timed around
  `engine.step()` and its batch read from `engine.last_step`. A cell whose prompts would fill more than CELL_STEPS
  full steps is left out (its extra steps all have the budget's shape), as is one the KV pool cannot hold
  (preemption storms are not step shapes). Cells run cheapest first, wave after wave, and one that would overrun
  --seconds (predicted from the cells before it) is left out: on a busy 2-core CPU with one thread, the tiny
  preset sweeps every cell three times in ~40 s, and gpt4-mini (~4 s per 2048-token step) fills the default
  120 s. The serving loop's own time between steps (HTTP, streaming, the GIL shared with the HTTP thread) is not
  part of an in-process step: the sweep leaves the profile's gap at 0.
- `--from-step-log FILE`, a server's log: the step fit from its steps (t1 - t0), and the gap fit from the time
  between two steps (t0 of a step - t1 of the one before), with the previous step's outputs and the requests added
  in between as features. A gap counts only when the engine stayed busy: some request the log added was neither
  finished nor aborted after the previous step, so the server's loop went straight on (AsyncEngine waits for
  commands only when it has no request). Idle waits for the next arrival are not overhead. With
  `--client-detail` (the `moekit bench serve --save-detailed` file of the same run), the latency a request spends
  outside the engine: the median of client TTFT - engine TTFT (`client_latency`), which the simulator adds to
  every request's arrival.

Both fits are profile.py's non-negative ones (relative error for steps, plain for gaps), with the model's experts
(n_expert, top_k, MoE layers) for the experts-read term; the first 5% of steps (a fresh engine runs cold: allocator,
caches) are left out. One summary line per fit goes to standard error.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from moekit.sim.profile import GAP_TERMS, STEP_TERMS, StepProfile, batch_features, fit, jitter_quantiles, nnls, step_row

CELL_STEPS = 8  # a cell's prompts fill at most this many full steps of max_num_batched_tokens
COLD = 20  # 1 / COLD of the steps, the first ones, are left out of the step fit
HINT = "write one with `moekit serve --step-log FILE`"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from moekit.infer.build import add_engine_arguments

    p.add_argument("--model", metavar="RUN|HF_DIR|PRESET",
                   help="what to measure: a moekit run or Hugging Face folder (as moekit serve takes), or a preset")
    p.add_argument("--out", required=True, help="the profile JSON to write")
    p.add_argument("--from-step-log", metavar="FILE.jsonl",
                   help="fit steps and gaps from this `moekit serve --step-log` instead of a sweep (no model runs)")
    p.add_argument("--client-detail", metavar="FILE.jsonl",
                   help="with --from-step-log: `moekit bench serve --save-detailed` of the same run, for the time a "
                        "request spends outside the engine (HTTP, tokenizing, streaming)")
    p.add_argument("--step-log", metavar="FILE.jsonl", help="write the sweep's own step log (the server's format)")
    p.add_argument("--waves", type=int, default=3, help="passes over the batch x prompt grid (default 3)")
    p.add_argument("--output-len", type=int, default=16, help="tokens each calibration request decodes (default 16)")
    p.add_argument("--seconds", type=float, default=120.0,
                   help="time the sweep may take: cells that would overrun it are left out (default 120)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    add_engine_arguments(p)


# ---- the sweep ------------------------------------------------------------------------------------------
def _record(engine, log: list) -> None:
    """After every step, append what it computed to `log`: (scheduled entries, preempted ids) of engine.last_step."""
    step = engine.step

    def recorded(*a, **k):
        out = step(*a, **k)
        if engine.last_step is not None:
            log.append((engine.last_step.scheduled, engine.last_step.preempted))
        return out

    engine.step = recorded


def cells(engine, waves: int, output_len: int) -> list[tuple[int, int]]:
    """The sweep's (batch, prompt length) cells, cheapest first, `waves` times over."""
    cfg, kv = engine.scheduler.config, engine.kv
    room = engine.max_model_len - output_len - 1
    if room < 1:
        raise ValueError(f"--output-len {output_len} leaves no room for a prompt in a context of "
                         f"{engine.max_model_len} tokens: lower it")
    budget = cfg.max_num_batched_tokens
    max_prompt = min(budget * 2, room)
    prompts = sorted({p for p in (4, 32, 128, 512, 2048) if p <= max_prompt} | {max_prompt})
    batches = sorted({b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= cfg.max_num_seqs} | {cfg.max_num_seqs})
    grid = [(b, p) for b in batches for p in prompts
            if b * -(-(p + output_len) // kv.block_size) <= kv.num_blocks and b * p <= CELL_STEPS * budget]
    return sorted(grid, key=lambda c: (c[0] * (c[1] + output_len), c)) * waves


class _Clock:
    """Predicts a cell's seconds from the cells run so far: seconds ~ tokens x a + steps x b (non-negative fit), so
    that the sweep can leave out what would overrun --seconds."""

    def __init__(self):
        self.rows: list[tuple[int, int]] = []
        self.secs: list[float] = []

    def add(self, tokens: int, steps: int, seconds: float) -> None:
        self.rows.append((tokens, steps))
        self.secs.append(seconds)

    def predict(self, tokens: int, steps: int) -> float:
        if len(self.rows) < 2:
            return 0.0
        import numpy as np

        a, b = nnls(np.asarray(self.rows, dtype=float), np.asarray(self.secs))
        return a * tokens + b * steps


def sweep(engine, *, waves: int = 3, output_len: int = 16, seconds: float | None = None, seed: int = 0,
          progress=None) -> list[dict]:
    """Run the calibration cells (those that fit in `seconds`, if given); one record per iteration, in
    `moekit serve --step-log`'s format."""
    from moekit.infer.sampler import SamplingParams

    rng = random.Random(seed)
    vocab, budget = engine.cfg.vocab_size, engine.scheduler.config.max_num_batched_tokens
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    grid = cells(engine, waves, output_len)
    records: list[dict] = []
    clock, n, skipped = _Clock(), 0, 0
    t_start = time.perf_counter()
    for i, (b, p) in enumerate(grid):
        cost = (b * (p + output_len), -(-b * p // budget) + output_len + 2)
        elapsed = time.perf_counter() - t_start
        if seconds is not None and len(clock.rows) >= 2 and elapsed + clock.predict(*cost) > seconds:
            skipped += 1  # a cheaper cell further on (the next wave's) may still fit
            if progress:
                progress(i + 1, len(grid), skipped)
            continue
        first = (b + 1) // 2
        # The second half joins once the first decodes: its prefill chunks share steps with their decodes.
        groups = [(0, first), (-(-first * p // budget) + 2, b - first)] if b > 1 else [(0, 1)]
        k = 0
        while groups or engine.has_unfinished():
            t_loop = time.perf_counter() - t_start
            added = []
            if groups and (k >= groups[0][0] or not engine.has_unfinished()):
                for _ in range(groups.pop(0)[1]):
                    rid = f"cal-{n}"
                    n += 1
                    engine.add_request([rng.randrange(vocab) for _ in range(p)], params, rid)
                    added.append([rid, p, output_len])
            t0 = time.perf_counter()
            outputs = engine.step()
            t1 = time.perf_counter()
            rec = engine.last_step
            row = {"t_loop": t_loop, "added": added, "aborted": [], "scheduled": []}
            if rec is not None:
                row.update(t0=t0 - t_start, t1=t1 - t_start, scheduled=rec.scheduled, preempted=rec.preempted,
                           outputs=sum(1 for o in outputs if o.new_token_ids),
                           finished=[o.request_id for o in outputs if o.finished])
            if rec is not None or added:
                records.append(row)
            for o in outputs:
                if o.finished:
                    engine.result(o.request_id)
            k += 1
        clock.add(cost[0], k, time.perf_counter() - t_start - elapsed)
        if progress:
            progress(i + 1, len(grid), skipped)
    return records


def moe_shape(cfg) -> dict:
    """The profile's `moe` for a ModelConfig: {} for a dense model."""
    return {"n_expert": cfg.n_expert, "top_k": cfg.top_k, "layers": cfg.n_moe_layers} if cfg.is_moe else {}


def step_samples(records: list[dict], moe: dict) -> tuple[list[tuple], list[float]]:
    """(step_row, seconds) of every logged step, the cold first 1 / COLD left out."""
    steps = [r for r in records if r.get("scheduled")]
    steps = steps[len(steps) // COLD:]
    return [step_row(batch_features(r["scheduled"]), moe) for r in steps], [r["t1"] - r["t0"] for r in steps]


def profile_from_records(records: list[dict], moe: dict, **meta) -> StepProfile:
    """The step fit of a sweep's records (gap left at 0)."""
    rows, secs = step_samples(records, moe)
    coef, stats = fit(rows, secs, STEP_TERMS)
    return StepProfile(step=coef, moe=moe, fit=stats, jitter=_jitter(coef, rows, secs), **meta)


def _jitter(coef: dict, rows: list[tuple], secs: list[float]) -> list[float]:
    """Quantiles of measured / fitted over the fitted steps."""
    c = [coef[t] for t in STEP_TERMS]
    predicted = [c[0] + sum(a * x for a, x in zip(c[1:], row, strict=True)) for row in rows]
    return jitter_quantiles(predicted, secs)


# ---- from a server's step log ---------------------------------------------------------------------------
def read_step_log(path: str | Path) -> tuple[dict, list[dict]]:
    """(its header: engine settings and moe, or {}; its iteration records) from `moekit serve --step-log`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--from-step-log {path}: no such file; {HINT}")
    header, rows = {}, []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if row.get("kind") == "moekit-step-log":
                header = row
                continue
            float(row["t_loop"])
            for _rid, prompt_len, max_tokens, *queued in row.get("added", []):
                int(prompt_len), int(max_tokens), [float(q) for q in queued]
            if "t0" in row:
                float(row["t0"]), float(row["t1"]), int(row["outputs"]), list(row["finished"])
                for _, n, c, _spec, n_logits in row["scheduled"]:
                    int(n), int(c), int(n_logits)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{path} line {i} is not a record of `moekit serve --step-log`; {HINT}") from None
        rows.append(row)
    return header, rows


def gap_samples(rows: list[dict]) -> tuple[list[tuple[int, int]], list[float]]:
    """((outputs of the step before, requests added in between), seconds) of every gap the engine stayed busy
    through: two consecutive step records with a request alive (added, not finished or aborted) after the first."""
    live: set[str] = set()
    prev = None
    feats, secs = [], []
    for row in rows:
        stepped = "t0" in row
        if stepped and prev is not None and live:
            feats.append((prev["outputs"], len(row.get("added", []))))
            secs.append(row["t0"] - prev["t1"])
        live.update(rid for rid, *_ in row.get("added", []))
        live.difference_update(row.get("aborted", []))
        live.difference_update(row.get("finished", []))
        prev = row if stepped else None
    return feats, secs


def engine_ttfts(rows: list[dict]) -> list[float]:
    """Seconds from when each request was queued for the engine thread (else the iteration that added it: an older
    log) to the end of the step that gave its first token, in the order the log added them (requests aborted before
    a token are left out). The wait for the engine's current step is in it: the simulator models that wait."""
    added, first = {}, {}
    for row in rows:
        for rid, _p, _m, *queued in row.get("added", []):
            added[rid] = queued[0] if queued else row["t_loop"]
        for rid, _n, _c, _spec, n_logits in row.get("scheduled", []):
            if n_logits and rid not in first:
                first[rid] = row["t1"]
    return [first[rid] - t for rid, t in added.items() if rid in first]


def client_latency(rows: list[dict], detail_path: str | Path) -> tuple[float, int]:
    """The time a request spends outside the engine as its client sees it (HTTP, tokenization, queues between the
    HTTP thread and the engine's, streaming back): the median over requests of the client's TTFT (a `moekit bench
    serve --save-detailed` file of the same run) minus the engine's, the k-th request sent paired with the k-th the
    log added (one client, arrivals apart: the server adds them in sending order), counting from the end (requests
    logged before the client's first, such as bench serve's test request, are not its). (seconds, requests paired)."""
    import numpy as np

    path = Path(detail_path)
    if not path.is_file():
        raise FileNotFoundError(f"--client-detail {path}: no such file; write it with `moekit bench serve "
                                "--save-detailed FILE.jsonl` against the server that wrote the step log")
    try:
        client = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        client = sorted((float(r["arrival"]), float(r["ttft"])) for r in client if r.get("ok", True))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"--client-detail {path} is not a `moekit bench serve --save-detailed` file") from None
    engine = engine_ttfts(rows)
    # bench serve sends a test request before the benchmark: requests the log holds before the client's are those.
    engine = engine[len(engine) - len(client):] if 0 < len(client) <= len(engine) else engine
    if len(client) != len(engine) or not engine:
        raise ValueError(f"--client-detail {path} holds {len(client)} completed requests, the step log "
                         f"{len(engine)}: give the detail file of the run the server logged (one benchmark per log)")
    return float(np.median([c - e for (_, c), e in zip(client, engine, strict=True)])), len(engine)


def profile_from_log(path: str | Path, model: str = "", moe: dict | None = None,
                     client_detail: str | Path | None = None) -> StepProfile:
    """The step and gap fits of a server's step log; moe: the model's experts where the log has no header (the
    sweep's own log), else the header's; client_detail: the client's view of the same run, for the latency a
    request spends outside the engine (else 0)."""
    header, rows = read_step_log(path)
    engine, moe = dict(header.get("engine") or {}), header.get("moe", moe or {})
    if engine.get("max_in_flight", 1) > 1:
        raise ValueError(f"{path} is the log of a pipelined server (its steps overlap): calibrate one that runs "
                         "in one process, without --pp")
    rows_s, secs_s = step_samples(rows, moe)
    if len(secs_s) < len(STEP_TERMS):
        raise ValueError(f"{path} holds {len(secs_s)} steps, too few to fit: send the server more requests "
                         "(e.g. `moekit bench serve`), then stop it")
    step, stats = fit(rows_s, secs_s, STEP_TERMS)
    rows_g, secs_g = gap_samples(rows)
    if len(secs_g) >= len(GAP_TERMS):
        gap, stats["gap"] = fit(rows_g, secs_g, GAP_TERMS, relative=False)
    else:
        gap, stats["gap"] = dict.fromkeys(GAP_TERMS, 0.0), {"samples": len(secs_g)}
    device = engine.pop("device", "cpu")
    for key in ("max_in_flight", "num_spec_tokens"):
        engine.pop(key, None)
    latency = 0.0
    if client_detail is not None:
        latency, stats["latency_requests"] = client_latency(rows, client_detail)
        latency = max(latency, 0.0)
    return StepProfile(step=step, gap=gap, model=model, device=device, source=f"step-log {path}", engine=engine,
                       moe=moe, fit=stats, latency_s=latency, jitter=_jitter(step, rows_s, secs_s))


# ---- the command ----------------------------------------------------------------------------------------
def _build_engine(args: argparse.Namespace):
    """The engine `moekit serve` would build from these flags; a preset gets random weights (seed 0)."""
    import torch

    from moekit.infer import build
    from moekit.presets import PRESETS, get_preset

    ecfg = build.EngineConfig.from_args(args)
    if ecfg.sharded:
        raise ValueError("calibrate measures one process: drop --tp/--pp/--ep")
    overrides = getattr(args, "overrides", None) or {}
    if args.model in PRESETS and not Path(args.model).exists():
        from moekit.model.transformer import Transformer
        from moekit.resolve import apply_overrides

        cfg = apply_overrides(get_preset(args.model), overrides)
        torch.manual_seed(0)
        model = Transformer(cfg)
        model.init_weights(0)
        return build._engine(ecfg, model.to(ecfg.torch_device, ecfg.torch_dtype).eval(), None, None, None)
    if overrides:
        raise ValueError(f"model overrides (--{', --'.join(overrides)}) apply to a preset, not to {args.model}")
    return build.build_engine(ecfg, progress=lambda *a: print(*a, file=sys.stderr))


def _summary(name: str, coef: dict, stats: dict, what: str) -> str:
    us = ", ".join(f"{k} {v * 1e6:.3g}" for k, v in coef.items())
    if "median_rel_err" not in stats:
        return f"{name} = 0 ({stats['samples']} {what}: too few to fit)"
    return (f"{name} = {us} (us); {stats['samples']} {what}, median error {stats['median_rel_err']:.1%}, "
            f"p90 {stats['p90_rel_err']:.1%}")


def run(args: argparse.Namespace) -> int:
    if args.from_step_log:
        prof = profile_from_log(args.from_step_log, model=args.model or "", client_detail=args.client_detail)
        prof.save(args.out)
        print(_summary("step", prof.step, prof.fit, "steps"), file=sys.stderr)
        print(_summary("gap", prof.gap, prof.fit["gap"], "gaps"), file=sys.stderr)
        if args.client_detail:
            print(f"outside the engine: {prof.latency_s * 1e3:.2f} ms per request (median of "
                  f"{prof.fit['latency_requests']} requests)", file=sys.stderr)
        print(f"wrote {args.out}", file=sys.stderr)
        return 0
    import torch

    if not args.model:
        raise ValueError("give --model RUN|PRESET to sweep, or --from-step-log FILE to fit a server's log")
    if args.waves < 1 or args.output_len < 1:
        raise ValueError("--waves and --output-len must be >= 1")
    if not args.seconds > 0:
        raise ValueError(f"--seconds must be > 0, got {args.seconds}")
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = _build_engine(args)
    engine.capture_graphs()  # as `moekit serve` does at start-up (a GPU's decode graphs; a no-op on a CPU)
    sc = engine.scheduler.config
    warm = max(1, min(sc.max_num_batched_tokens, engine.max_model_len - 3))
    engine.generate([[1] * warm, [2, 3]], None)  # warm-up: a full-budget prefill and a decode
    t = time.perf_counter()
    records = sweep(engine, waves=args.waves, output_len=args.output_len, seconds=args.seconds,
                    progress=lambda i, n, skip: print(f"\rcalibrating {i}/{n} cells" + (
                        f" ({skip} left out to fit --seconds)" if skip else ""), end="", file=sys.stderr))
    print(f" ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    kv = engine.kv
    prof = profile_from_records(
        records, moe_shape(engine.cfg), model=str(args.model), device=str(engine.device),
        threads=torch.get_num_threads(), source="sweep",
        engine={"num_blocks": kv.num_blocks, "block_size": kv.block_size, "max_num_seqs": sc.max_num_seqs,
                "max_num_batched_tokens": sc.max_num_batched_tokens, "max_model_len": sc.max_model_len,
                "enable_prefix_caching": kv.enable_caching})
    prof.save(args.out)
    if args.step_log:
        from moekit.util import atomic_write_text

        # No header line: the engine's settings are in the profile (every line here is an iteration).
        atomic_write_text(args.step_log, "".join(json.dumps(r) + "\n" for r in records))
    print(_summary("step", prof.step, prof.fit, "steps") + " (gap 0: measure it with --from-step-log)",
          file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
