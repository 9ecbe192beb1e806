"""`moekit sim replay`: run a real server's step log through the simulator and compare the decisions.

    moekit serve --model runs/tiny --step-log steps.jsonl &      # then any traffic, e.g. moekit bench serve
    moekit sim replay --step-log steps.jsonl --num-blocks 4096 --max-num-seqs 256 --max-num-batched-tokens 2048

The log gives each request's arrival (the loop iteration that added it), its prompt and output lengths, and every
step's duration; the simulator replays them (each step takes the time it took, each gap between steps the gap it
had) through its own Scheduler and KV manager and must make the same batches (request, tokens, tokens computed
before) and preempt the same requests at the same steps. Prompts are synthetic token ids: where real prompts shared
full blocks (a shared system prompt), prefix-cache hits can differ; without shared prefixes the replay is exact.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from moekit.sim.replica import Replica, Results, prompt_ids
from moekit.sim.steptime import StepCost

EPS = 1e-9  # an arrival lands just before the iteration that added it


@dataclass
class LoggedStep:
    t_loop: float
    t1: float
    scheduled: list[tuple[str, int, int]]  # (request id, tokens, computed before)
    preempted: list[str]


def read_log(path: str | Path) -> tuple[list[tuple[float, str, int, int]], list[LoggedStep]]:
    """(arrivals as (time, request id, prompt_len, output_len), steps) from `moekit serve --step-log`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--step-log {path}: no such file; write one with `moekit serve --step-log FILE`")
    arrivals, steps, sampled, max_tokens = [], [], defaultdict(int), {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            for rid, prompt_len, mt, *_ in row.get("added", []):
                arrivals.append((row["t_loop"] - EPS, rid, int(prompt_len), int(mt)))
                max_tokens[rid] = int(mt)
            if "t0" in row and row.get("scheduled") is not None and "t1" in row:
                sched = [(e[0], int(e[1]), int(e[2])) for e in row["scheduled"]]
                for e in row["scheduled"]:
                    if len(e) >= 5:
                        sampled[e[0]] += int(e[4]) > 0
                if sched or row.get("preempted"):
                    steps.append(LoggedStep(float(row["t_loop"]), float(row["t1"]), sched,
                                            list(row.get("preempted", []))))
        except (ValueError, KeyError, TypeError, IndexError):
            raise ValueError(f"{path} line {i} is not a step-log record of `moekit serve --step-log`") from None
    # Output lengths: the tokens each request sampled (EOS may have stopped it before max_tokens).
    arrivals = [(t, rid, p, sampled.get(rid) or mt) for t, rid, p, mt in arrivals]
    return arrivals, steps


class ReplayModel:
    """Each step takes the time its logged twin took; each gap after it the logged gap to the next iteration."""

    num_stages, n_gpus = 1, 1

    def __init__(self, steps: list[LoggedStep]):
        self.steps, self.k = steps, 0
        self.cfg = None

    def step(self, w) -> StepCost:
        k = min(self.k, len(self.steps) - 1)
        st = self.steps[k]
        return StepCost([st.t1 - st.t_loop], 0.0, 0.0, 0.0, 0.0)

    def gap_seconds(self, outputs: int, added: int) -> float:
        k = self.k
        self.k += 1
        if k + 1 < len(self.steps):
            return max(0.0, self.steps[k + 1].t_loop - self.steps[k].t1)
        return 0.0

    def describe(self) -> dict:
        return {"kind": "replay", "steps": len(self.steps)}


def replay(arrivals, steps: list[LoggedStep], *, num_blocks: int, block_size: int = 16, max_num_seqs: int = 256,
           max_num_batched_tokens: int = 2048, max_model_len: int = 2048, enable_prefix_caching: bool = True,
           vocab: int = 50_000) -> dict:
    """Drive one simulated replica with the log's arrivals and step times; compare its steps with the log's."""
    model = ReplayModel(steps)
    rep = Replica(0, model, Results(), num_blocks=num_blocks, block_size=block_size,
                  max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                  max_model_len=max_model_len, enable_prefix_caching=enable_prefix_caching, record=True)
    arrivals = sorted(arrivals, key=lambda a: a[0])  # stable: same-instant arrivals keep their log order
    i = 0
    while i < len(arrivals) or rep.has_work():
        if i < len(arrivals) and (not rep.has_work() or arrivals[i][0] <= rep.time):
            t, rid, p, o = arrivals[i]
            if not rep.has_work():
                rep.time = max(rep.time, t)
            rep.add(i, t, prompt_ids(i, p, vocab=vocab), o, rid)
            i += 1
            continue
        rep.iterate()
    sim = [([(r, n, c) for r, n, c, _ in sched], pre) for sched, pre in rep.log]
    real = [(s.scheduled, s.preempted) for s in steps]
    first = next((k for k, (a, b) in enumerate(zip(sim, real, strict=False)) if a != b), None)
    if first is None and len(sim) != len(real):
        first = min(len(sim), len(real))
    out = {"steps_logged": len(real), "steps_simulated": len(sim),
           "identical_steps": sum(a == b for a, b in zip(sim, real, strict=False)),
           "preemptions_logged": sum(len(p) for _, p in real), "preemptions_simulated": sum(len(p) for _, p in sim),
           "same": first is None}
    if first is not None:
        out["first_difference"] = {"step": first, "logged": real[first] if first < len(real) else None,
                                   "simulated": sim[first] if first < len(sim) else None}
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--step-log", required=True, help="the JSONL `moekit serve --step-log` wrote")
    p.add_argument("--num-blocks", type=int, required=True, help="the server's KV blocks (its startup log)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--no-prefix-caching", action="store_true")


def run(args: argparse.Namespace) -> int:
    arrivals, steps = read_log(args.step_log)
    if not steps:
        raise ValueError(f"--step-log {args.step_log} holds no step: send the server some requests first")
    out = replay(arrivals, steps, num_blocks=args.num_blocks, block_size=args.block_size,
                 max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                 max_model_len=args.max_model_len, enable_prefix_caching=not args.no_prefix_caching)
    print(json.dumps(out, indent=1))
    return 0 if out["same"] else 1
