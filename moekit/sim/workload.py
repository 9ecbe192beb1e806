"""Workloads for the simulator: arrivals, lengths, shared prefixes, and real production traces.

    reqs = synthetic(rate=4, duration=600, prompt="lognormal:1024:1.0", output="256", shared_prefix_len=512)
    reqs = load_trace(builtin_trace("conv"), start=0, duration=600, time_scale=2.0)   # Azure 2023, twice as fast
    times = daily_curve(peak_rate=8, duration=86400)                                  # a day's load curve

A workload is a list of `SimRequest` sorted by arrival. Arrivals follow `moekit bench serve` (vLLM): gamma
inter-arrival times of shape `burstiness` and mean 1/rate (1 = Poisson). The daily curve is a non-homogeneous
Poisson process drawn by thinning (Lewis & Shedler 1979). The shipped traces (moekit/sim/traces/) are the Azure LLM
inference trace 2023, CC-BY 4.0, with the attribution in their README (Patel et al., "Splitwise", ISCA 2024).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

TRACES = Path(__file__).parent / "traces"
TRACE_FILES = {"conv": "AzureLLMInferenceTrace_conv.csv", "code": "AzureLLMInferenceTrace_code.csv"}


@dataclass(slots=True)
class SimRequest:
    arrival: float  # seconds from the start of the workload
    prompt_len: int
    output_len: int  # tokens generated: the simulator ignores EOS and asks for exactly this many
    prefix_id: int = -1  # requests with the same prefix_id >= 0 share their first prefix_len prompt tokens
    prefix_len: int = 0


def arrivals(rate: float, *, duration: float | None = None, n: int | None = None, burstiness: float = 1.0,
             seed: int = 0) -> list[float]:
    if not rate > 0 or not math.isfinite(rate):
        raise ValueError(f"the request rate must be > 0 requests/s, got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if duration is None and n is None:
        raise ValueError("give a duration or a number of requests")
    rng = random.Random(seed)
    out, t = [], 0.0
    while (n is None or len(out) < n):
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        if duration is not None and t > duration:
            break
        out.append(t)
    return out


def daily_rate(t: float, peak_rate: float, duration: float = 86400, trough: float = 0.25,
               peak_at: float = 14 / 24) -> float:
    """The offered rate at time t: a cosine over one `duration` between trough x peak and peak, highest at
    `peak_at` of the way through (14:00 for a day)."""
    phase = 2 * math.pi * (t / duration - peak_at)
    return peak_rate * (trough + (1 - trough) * (1 + math.cos(phase)) / 2)


def daily_curve(peak_rate: float, *, duration: float = 86400, trough: float = 0.25, seed: int = 0) -> list[float]:
    """Arrival times over one day compressed into `duration` seconds (duration 3600: a day in an hour), by
    thinning a Poisson process of the peak rate."""
    if not 0 <= trough <= 1:
        raise ValueError(f"trough must be a share of the peak in [0, 1], got {trough}")
    rng = random.Random(seed)
    out, t = [], 0.0
    while True:
        t += rng.expovariate(peak_rate)
        if t > duration:
            return out
        if rng.random() * peak_rate <= daily_rate(t, peak_rate, duration, trough):
            out.append(t)


class LengthDist:
    """'128' (fixed), 'uniform:LO:HI', or 'lognormal:MEAN:SIGMA' (MEAN in tokens, SIGMA of the log); >= 1."""

    def __init__(self, spec: str):
        self.spec = spec
        parts = str(spec).split(":")
        try:
            if len(parts) == 1:
                self.kind, self.a, self.b = "fixed", int(parts[0]), 0
            elif parts[0] == "uniform" and len(parts) == 3:
                self.kind, self.a, self.b = "uniform", int(parts[1]), int(parts[2])
            elif parts[0] == "lognormal" and len(parts) == 3:
                self.kind, self.a, self.b = "lognormal", float(parts[1]), float(parts[2])
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"length {spec!r}: give N, uniform:LO:HI or lognormal:MEAN:SIGMA "
                             "(e.g. 512, uniform:16:512, lognormal:1024:1.0)") from None
        if self.a < 1 or self.b < 0 or (self.kind == "uniform" and self.b < self.a):
            raise ValueError(f"length {spec!r}: lengths must be >= 1 (and LO <= HI)")

    def sample(self, n: int, rng: random.Random) -> list[int]:
        if self.kind == "fixed":
            return [self.a] * n
        if self.kind == "uniform":
            return [rng.randint(self.a, self.b) for _ in range(n)]
        mu = math.log(self.a) - self.b ** 2 / 2  # so that the mean is MEAN
        return [max(1, round(rng.lognormvariate(mu, self.b))) for _ in range(n)]


def parse_lengths(spec: str) -> LengthDist:
    return LengthDist(spec)


def synthetic(rate: float, duration: float, prompt: str = "128", output: str = "64", *, burstiness: float = 1.0,
              shared_prefix_len: int = 0, num_prefixes: int = 1, seed: int = 0) -> list[SimRequest]:
    if shared_prefix_len < 0 or num_prefixes < 1:
        raise ValueError("--shared-prefix-len must be >= 0 and --num-prefixes >= 1")
    times = arrivals(rate, duration=duration, burstiness=burstiness, seed=seed)
    rng = random.Random(seed + 1)
    ins, outs = parse_lengths(prompt).sample(len(times), rng), parse_lengths(output).sample(len(times), rng)
    k = shared_prefix_len
    return [SimRequest(t, max(p, k + 1), o, i % num_prefixes if k else -1, k)
            for i, (t, p, o) in enumerate(zip(times, ins, outs, strict=True))]


def builtin_trace(name: str) -> Path:
    if name not in TRACE_FILES:
        raise ValueError(f"no shipped trace {name!r}: choose one of {', '.join(TRACE_FILES)}")
    return TRACES / TRACE_FILES[name]


def _seconds(stamp: str) -> float:
    """'2023-11-16 18:17:03.9799600' -> seconds since midnight (7 fractional digits: fromisoformat may refuse)."""
    _, clock = stamp.strip().split(" ")
    h, m, s = clock.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def load_trace(path: str | Path, *, start: float = 0.0, duration: float | None = None, time_scale: float = 1.0,
               max_len: int | None = None) -> list[SimRequest]:
    """An Azure trace CSV (TIMESTAMP,ContextTokens,GeneratedTokens) or a `moekit bench serve --save-detailed`
    JSONL as a workload: arrivals in seconds since its first row, the window [start, start + duration) re-based to
    0, divided by `time_scale` (2: twice as fast). GeneratedTokens 0 counts as 1 (a request yields a token).
    `max_len`: lengths clipped so prompt + output <= max_len (the prompt first)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace {path}: no such file (the shipped ones: --trace conv or --trace code)")
    if not time_scale > 0:
        raise ValueError(f"--time-scale must be > 0, got {time_scale}")
    rows = []
    lines = path.read_text().splitlines()
    if path.suffix == ".jsonl":
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                rows.append((i, float(r["arrival"]), r["prompt_len"], r["output_len"]))
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path} line {i}: not a JSON object with arrival, prompt_len, output_len") from None
    else:
        if not lines or lines[0].strip().split(",")[:3] != ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]:
            raise ValueError(f"{path} line 1: the header must be TIMESTAMP,ContextTokens,GeneratedTokens "
                             "(the Azure LLM inference trace format)")
        for i, line in enumerate(lines[1:], 2):
            if not line.strip():
                continue
            cells = line.split(",")
            try:
                t = _seconds(cells[0])
            except (ValueError, IndexError):
                raise ValueError(f"{path} line {i}: timestamp {cells[0]!r} is not YYYY-MM-DD HH:MM:SS.fff") from None
            rows.append((i, t, *cells[1:3]))
    out = []
    t0 = None
    for i, t, p, o in rows:
        try:
            p, o = int(p), int(o)
        except (ValueError, TypeError):
            p = o = -1
        if p < 1 or o < 0:
            raise ValueError(f"{path} line {i}: prompt length {p} / output length {o}: lengths must be whole "
                             "numbers, the prompt >= 1 and the output >= 0; fix or drop that row")
        t0 = t if t0 is None else t0
        rel = t - t0
        if rel < start or (duration is not None and rel >= start + duration):
            continue
        o = max(o, 1)
        if max_len is not None:
            p = min(p, max_len - 1)
            o = min(o, max_len - p)
        out.append(SimRequest((rel - start) / time_scale, p, o))
    out.sort(key=lambda r: r.arrival)
    return out


def summary(reqs: list[SimRequest]) -> dict:
    import numpy as np

    if not reqs:
        return {"requests": 0}
    p = np.array([r.prompt_len for r in reqs])
    o = np.array([r.output_len for r in reqs])
    span = reqs[-1].arrival - reqs[0].arrival
    return {"requests": len(reqs), "span_s": span, "offered_rate": len(reqs) / span if span else None,
            "prompt_len": {"mean": float(p.mean()), "p50": float(np.median(p)), "p90": float(np.percentile(p, 90))},
            "output_len": {"mean": float(o.mean()), "p50": float(np.median(o)), "p90": float(np.percentile(o, 90))},
            "shared_prefix_share": sum(r.prefix_id >= 0 for r in reqs) / len(reqs)}
