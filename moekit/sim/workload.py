"""Workloads for the simulator: arrivals, lengths, shared prefixes, and real production traces.

    reqs = synthetic(rate=4, duration=600, prompt="lognormal:1024:1.0", output="256", shared_prefix_len=512)
    reqs = load_trace(builtin_trace("conv"), start=0, duration=600, time_scale=2.0)   # Azure 2023, twice as fast
    reqs = load_trace("bench.jsonl")                 # what `moekit bench serve --save-detailed` sent, replayed
    times = daily_curve(peak_rate=8, time_scale=24)  # a day's load curve, played in an hour

A workload is a list of `SimRequest` sorted by arrival, in seconds from its start. Arrivals follow `moekit bench
serve` (vLLM's `benchmarks/serve.py`): gamma inter-arrival times of shape `burstiness` and mean 1/rate (1 = Poisson).
The daily curve is a non-homogeneous Poisson process drawn by thinning (Lewis & Shedler 1979). The shipped traces
(moekit/sim/traces/) are the Azure LLM inference trace 2023, CC-BY 4.0, with the attribution in their README
(Patel et al., "Splitwise", ISCA 2024). Pure Python (numpy only in `summary`); nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

TRACES = Path(__file__).parent / "traces"
TRACE_FILES = {"conv": "AzureLLMInferenceTrace_conv.csv", "code": "AzureLLMInferenceTrace_code.csv"}
TRACE_HEADER = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
LENGTH_FORMS = "N, uniform:LO:HI or lognormal:MEAN:SIGMA (e.g. 512, uniform:16:512, lognormal:1024:1.0)"


@dataclass(slots=True)
class SimRequest:
    arrival: float  # seconds from the start of the workload
    prompt_len: int  # tokens
    output_len: int  # tokens generated: the simulator ignores EOS and asks for exactly this many
    prefix_id: int = -1  # requests with the same prefix_id >= 0 share their first prefix_len prompt tokens
    prefix_len: int = 0  # (a shared system prompt: what the prefix cache serves)


class Workload(list):
    """A list of SimRequest (what `load_trace` and `clip` return) that also says what was changed on the way:
    `clipped` requests were shortened to fit a context length, `skipped` rows of a bench-detail JSONL had failed
    (`"ok": false`) and are left out. Being a list, it goes wherever a workload does."""

    def __init__(self, requests=(), clipped: int = 0, skipped: int = 0):
        super().__init__(requests)
        self.clipped = clipped
        self.skipped = skipped


# ---- arrivals ----------------------------------------------------------------------------------------------
def arrivals(rate: float, *, duration: float | None = None, n: int | None = None, burstiness: float = 1.0,
             seed: int = 0) -> list[float]:
    """Arrival times of a renewal process from 0: gaps gamma(shape = burstiness, mean = 1 / rate), stopping after
    `duration` seconds or `n` arrivals (whichever comes first). These are the draws of
    `moekit.serve.bench.arrival_gaps` with random.Random(seed): bench serve sends request 0 at once and request
    k at arrivals(rate, n=N - 1, seed=seed)[k - 1]."""
    if not rate > 0 or not math.isfinite(rate):
        raise ValueError(f"the request rate must be > 0 requests/s and finite, got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0 (1 = Poisson), got {burstiness}")
    if duration is None and n is None:
        raise ValueError("give a duration or a number of requests")
    rng = random.Random(seed)
    out, t = [], 0.0
    while n is None or len(out) < n:
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        if duration is not None and t > duration:
            break
        out.append(t)
    return out


def daily_rate(t: float, peak_rate: float, *, trough: float = 0.25, peak_hour: float = 14.0,
               time_scale: float = 1.0) -> float:
    """The offered rate (requests per simulated second) at simulated time t of `daily_curve` with the same
    arguments: a cosine over the 24 hours of the clock, `peak_rate` at `peak_hour`, trough x peak_rate twelve
    hours away. The clock reads t x time_scale seconds after midnight. For charts of the offered load."""
    hour = (t * time_scale / 3600.0) % 24.0
    return peak_rate * (trough + (1 - trough) * (1 + math.cos(2 * math.pi * (hour - peak_hour) / 24.0)) / 2)


def daily_curve(peak_rate: float, *, duration: float = 86400.0, trough: float = 0.25, peak_hour: float = 14.0,
                seed: int = 0, time_scale: float = 1.0) -> list[float]:
    """Arrivals over `duration` seconds of a day's clock from midnight (86400: the whole day), the clock running
    `time_scale` times faster than simulated time, as a trace's `time_scale` does (24: a day in an hour; the
    arrivals then span duration / time_scale seconds). The rate follows `daily_rate` and is per *simulated*
    second: `peak_rate` is what the servers see at the peak whatever the time_scale (speeding the day up
    compresses its shape, not its load, unlike a trace whose fixed arrivals come time_scale times as often).
    Drawn by thinning (Lewis & Shedler 1979): a Poisson process of the peak rate, each arrival kept with
    probability rate(t) / peak_rate."""
    if not peak_rate > 0 or not math.isfinite(peak_rate):
        raise ValueError(f"the peak rate must be > 0 requests/s and finite, got {peak_rate}")
    if not 0 <= trough <= 1:
        raise ValueError(f"trough must be a share of the peak in [0, 1], got {trough}")
    if not 0 <= peak_hour < 24:
        raise ValueError(f"peak_hour must be an hour of the day in [0, 24), got {peak_hour}")
    if not duration > 0 or not time_scale > 0:
        raise ValueError(f"duration and time_scale must be > 0, got {duration} and {time_scale}")
    rng = random.Random(seed)
    end = duration / time_scale
    out, t = [], 0.0
    while True:
        t += rng.expovariate(peak_rate)
        if t > end:
            return out
        if rng.random() * peak_rate <= daily_rate(t, peak_rate, trough=trough, peak_hour=peak_hour,
                                                  time_scale=time_scale):
            out.append(t)


# ---- lengths -----------------------------------------------------------------------------------------------
class LengthDist:
    """A token-length distribution, from a spec string; every sample is >= 1.

    "128": always 128. "uniform:LO:HI": integers LO..HI, both included. "lognormal:MEAN:SIGMA": a log-normal
    whose mean is MEAN tokens and whose log has standard deviation SIGMA (the median is MEAN x exp(-SIGMA^2 / 2);
    SIGMA 1 puts the 90th percentile near 2.3 x MEAN; production prompt and output lengths are roughly
    log-normal, e.g. the Azure 2023 traces), rounded to whole tokens."""

    def __init__(self, spec: str | int, what: str = "length"):
        self.spec = str(spec).strip()
        parts = self.spec.split(":")
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
            raise ValueError(f"{what} {self.spec!r}: give {LENGTH_FORMS}") from None
        if not (self.a >= 1 and self.b >= 0 and math.isfinite(self.a) and math.isfinite(self.b)):
            raise ValueError(f"{what} {self.spec!r}: lengths must be >= 1 (and SIGMA >= 0); give {LENGTH_FORMS}")
        if self.kind == "uniform" and self.b < self.a:
            raise ValueError(f"{what} {self.spec!r}: LO must be <= HI; give {LENGTH_FORMS}")

    @property
    def fixed(self) -> int | None:
        """The length when it is always the same, else None."""
        return self.a if self.kind == "fixed" else None

    def sample(self, n: int, rng: random.Random) -> list[int]:
        """n lengths drawn with `rng` (a fixed length draws nothing from it)."""
        if self.kind == "fixed":
            return [self.a] * n
        if self.kind == "uniform":
            return [rng.randint(self.a, self.b) for _ in range(n)]
        mu = math.log(self.a) - self.b**2 / 2  # E[exp(N(mu, s^2))] = exp(mu + s^2 / 2) = MEAN
        return [max(1, round(rng.lognormvariate(mu, self.b))) for _ in range(n)]

    def __repr__(self) -> str:
        return f"LengthDist({self.spec!r})"


def parse_lengths(spec: str | int, what: str = "length") -> LengthDist:
    """A `LengthDist` from "128", "uniform:16:512" or "lognormal:MEAN:SIGMA"; `what` names it in errors
    (e.g. "--prompt-len")."""
    return LengthDist(spec, what)


def synthetic(rate: float, duration: float, prompt: str = "128", output: str = "64", *, burstiness: float = 1.0,
              shared_prefix_len: int = 0, num_prefixes: int = 1, seed: int = 0) -> list[SimRequest]:
    """`duration` seconds of gamma arrivals at `rate`, lengths drawn from the `prompt` and `output` specs. With
    `shared_prefix_len` k > 0, request i starts with shared prompt i % num_prefixes of k tokens (a system
    prompt) and its prompt is at least k + 1 tokens long."""
    if shared_prefix_len < 0 or num_prefixes < 1:
        raise ValueError("--shared-prefix-len must be >= 0 and --num-prefixes >= 1")
    times = arrivals(rate, duration=duration, burstiness=burstiness, seed=seed)
    rng = random.Random(seed + 1)
    ins = parse_lengths(prompt, "prompt length").sample(len(times), rng)
    outs = parse_lengths(output, "output length").sample(len(times), rng)
    k = shared_prefix_len
    return [SimRequest(t, max(p, k + 1), o, i % num_prefixes if k else -1, k)
            for i, (t, p, o) in enumerate(zip(times, ins, outs, strict=True))]


def clip(requests: list[SimRequest], max_len: int) -> Workload:
    """The requests with prompt_len + output_len <= max_len: the prompt cut to max_len - 1 first, then the output
    to what is left (both stay >= 1); `.clipped` counts those changed (plus any the input already counted)."""
    if max_len < 2:
        raise ValueError(f"a context of {max_len} tokens holds no prompt and output token: give a length >= 2")
    out = Workload(clipped=getattr(requests, "clipped", 0), skipped=getattr(requests, "skipped", 0))
    for r in requests:
        p = min(r.prompt_len, max_len - 1)
        o = min(r.output_len, max_len - p)
        if p != r.prompt_len or o != r.output_len:
            r = dataclasses.replace(r, prompt_len=p, output_len=o, prefix_len=min(r.prefix_len, p))
            out.clipped += 1
        out.append(r)
    return out


# ---- traces ------------------------------------------------------------------------------------------------
def builtin_trace(name: str) -> Path:
    """The shipped Azure LLM inference trace 2023 hour: "conv" (19,366 requests) or "code" (8,819)."""
    if name not in TRACE_FILES:
        raise ValueError(f"no shipped trace {name!r}: choose one of {', '.join(TRACE_FILES)}")
    return TRACES / TRACE_FILES[name]


def resolve_trace(name_or_path: str | Path) -> Path:
    """`conv` / `code`: the shipped traces; anything else: a file path."""
    return builtin_trace(str(name_or_path)) if str(name_or_path) in TRACE_FILES else Path(name_or_path)


def _seconds(stamp: str, days: dict) -> float:
    """'2023-11-16 18:17:03.9799600' -> seconds since midnight of the first date seen (`days` caches each date's
    offset; relative, so that a float keeps the 100 ns of the stamps). Azure's 7 fractional digits are more than
    datetime.fromisoformat takes before Python 3.11, so the clock is read by hand."""
    date, sep, clock = stamp.strip().replace("T", " ").partition(" ")
    if not sep:
        raise ValueError(stamp)
    if date not in days:
        day = datetime.date.fromisoformat(date).toordinal()
        days[date] = (day - days.setdefault(None, day)) * 86400.0
    h, m, s = clock.split(":")
    h, m, s = int(h), int(m), float(s)
    if not (0 <= h < 24 and 0 <= m < 60 and 0 <= s < 61):
        raise ValueError(stamp)
    return days[date] + h * 3600 + m * 60 + s


def _length(cell, where: str, what: str, minimum: int, column: str = "") -> int:
    """A token count from a trace cell, or a ValueError that names the line and says what is accepted."""
    try:
        v = cell if isinstance(cell, int) and not isinstance(cell, bool) else int(str(cell).strip())
    except ValueError:
        v = None
    if v is None or v < minimum:
        shown = f"{v if v is not None else repr(cell)}" + (f" ({column})" if column else "")
        raise ValueError(f"{where}: {what} {shown}: lengths must be whole numbers, the prompt >= 1 and the output "
                         ">= 0 (0 counts as 1); fix or drop that row")
    return v


def _csv_rows(path: Path, lines: list[str]) -> list[tuple[float, int, int]]:
    if not lines or [c.strip() for c in lines[0].split(",")[:3]] != TRACE_HEADER:
        raise ValueError(f"{path} line 1: the header must be {','.join(TRACE_HEADER)} (the Azure LLM inference "
                         "trace format), or give a `moekit bench serve --save-detailed` .jsonl file")
    rows, days = [], {}
    for i, text in enumerate(lines[1:], 2):
        if not text.strip():
            continue
        cells = text.split(",")
        where = f"{path} line {i}"
        if len(cells) < 3:
            raise ValueError(f"{where}: expected 3 values ({','.join(TRACE_HEADER)}), got {len(cells)}")
        try:
            t = _seconds(cells[0], days)
        except ValueError:
            raise ValueError(f"{where}: timestamp {cells[0]!r} is not YYYY-MM-DD HH:MM:SS.fffffff; fix or drop "
                             "that row") from None
        rows.append((t, _length(cells[1], where, "prompt length", 1, "ContextTokens"),
                     _length(cells[2], where, "output length", 0, "GeneratedTokens")))
    return rows


def _jsonl_rows(path: Path, lines: list[str]) -> tuple[list[tuple[float, int, int]], int]:
    rows, skipped = [], 0
    for i, text in enumerate(lines, 1):
        if not text.strip():
            continue
        where = f"{path} line {i}"
        try:
            r = json.loads(text)
            t = float(r["arrival"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{where}: not a JSON object with arrival, prompt_len and output_len (the format of "
                             "`moekit bench serve --save-detailed`)") from None
        if r.get("ok") is False:
            skipped += 1  # a failed request (a 400, a 429, a timeout): the server did not serve it
            continue
        if not (t >= 0 and math.isfinite(t)):
            raise ValueError(f"{where}: arrival {t} must be seconds >= 0 since the start of the run")
        rows.append((t, _length(r.get("prompt_len"), where, "prompt_len", 1),
                     _length(r.get("output_len"), where, "output_len", 0)))
    return rows, skipped


def load_trace(path: str | Path, *, start: float = 0.0, duration: float | None = None, time_scale: float = 1.0,
               max_len: int | None = None, max_requests: int | None = None) -> Workload:
    """A request trace as a workload (a `Workload`: a list of SimRequest with `.clipped` and `.skipped`).

    Formats: an Azure trace CSV (TIMESTAMP,ContextTokens,GeneratedTokens), arrivals counted from its first
    (earliest) row; or, for a `.jsonl` file, the detail file of `moekit bench serve --save-detailed`, whose
    arrivals are already seconds since the start of that run and whose failed rows (`"ok": false`) are skipped.
    Then: the window [start, start + duration) of those seconds is kept and re-based to 0, its first
    `max_requests` rows kept, the arrivals divided by `time_scale` (2: twice as fast, arrivals twice as often),
    and, with `max_len`, lengths clipped so that prompt + output <= max_len (see `clip`). A GeneratedTokens of
    0 counts as 1: a served request yields at least one token. Bad rows raise a ValueError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace {path}: no such file (the shipped ones: conv or code)")
    if not time_scale > 0 or not math.isfinite(time_scale):
        raise ValueError(f"the time scale must be > 0 (2 = twice as fast), got {time_scale}")
    if start < 0 or (duration is not None and not duration > 0):
        raise ValueError(f"the trace window needs start >= 0 and duration > 0 seconds, got {start} and {duration}")
    if max_requests is not None and max_requests < 1:
        raise ValueError(f"max_requests must be >= 1, got {max_requests}")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file: give a trace CSV or a bench-serve detail .jsonl") from None
    skipped = 0
    if path.suffix == ".jsonl":
        rows, skipped = _jsonl_rows(path, lines)
        t0 = 0.0
    else:
        rows = _csv_rows(path, lines)
        t0 = min((t for t, _, _ in rows), default=0.0)
    end = math.inf if duration is None else start + duration
    rows = sorted(((t - t0, p, o) for t, p, o in rows), key=lambda r: r[0])  # stable: ties keep file order
    out = [SimRequest((t - start) / time_scale, p, max(o, 1)) for t, p, o in rows if start <= t < end]
    if max_requests is not None:
        out = out[:max_requests]
    w = Workload(out, skipped=skipped)
    return clip(w, max_len) if max_len is not None else w


def load_dataset(path: str | Path, tokenizer=None, *, n: int | None = None, rate: float = math.inf,
                 burstiness: float = 1.0, seed: int = 0, output_len: int = 64) -> list[SimRequest]:
    """The requests `moekit bench serve --dataset FILE.jsonl` sends ({"prompt": ..., "output_len": N} a line):
    `n` of them (default: one per line), cycling over the lines as bench serve does, sent at bench serve's
    times for `rate`, `burstiness` and `seed` (request 0 at 0, then its gamma gaps; rate inf: all at 0).
    prompt_len: tokens from `tokenizer` (a tokenizer.json, its folder, or a `tokenizers.Tokenizer`; no special
    tokens, which the server may add), else whitespace words (bench serve's random prompts are about one token
    per word). A line without output_len (or max_tokens) asks for `output_len`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {path}: no such file")
    texts, outs = [], []
    for i, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text, out = row["prompt"], row.get("output_len", row.get("max_tokens", output_len))
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"dataset {path} line {i} is not a JSON object with a \"prompt\" string") from None
        if not isinstance(text, str) or not isinstance(out, int) or isinstance(out, bool) or out < 1:
            raise ValueError(f"dataset {path} line {i}: prompt must be a string and output_len a whole number >= 1")
        texts.append(text)
        outs.append(out)
    if not texts:
        raise ValueError(f"dataset {path} holds no prompts")
    if tokenizer is None:
        lens = [max(1, len(t.split())) for t in texts]
    else:
        if not hasattr(tokenizer, "encode_batch"):
            from tokenizers import Tokenizer

            tok_path = Path(tokenizer)
            tok_path = tok_path / "tokenizer.json" if tok_path.is_dir() else tok_path
            if not tok_path.is_file():
                raise FileNotFoundError(f"tokenizer {tokenizer}: no tokenizer.json there")
            tokenizer = Tokenizer.from_file(str(tok_path))
        lens = [max(1, len(e.ids)) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    n = len(texts) if n is None else n
    if n < 1:
        raise ValueError(f"the number of requests must be >= 1, got {n}")
    times = [0.0] * n if not math.isfinite(rate) else [0.0] + arrivals(rate, n=n - 1, burstiness=burstiness,
                                                                       seed=seed)
    return [SimRequest(times[i], lens[i % len(texts)], outs[i % len(texts)]) for i in range(n)]


def summary(requests: list[SimRequest]) -> dict:
    """What a workload is, for the simulator's JSON: request count, duration (s, to the last arrival), offered
    requests/s, prompt and output lengths (mean, p50, p90), the share of requests (and of prompt tokens) in a
    shared prefix; `clipped` / `skipped` when it is a `Workload` from a trace."""
    import numpy as np

    out: dict = {"count": len(requests)}
    if requests:
        p = np.array([r.prompt_len for r in requests], dtype=np.float64)
        o = np.array([r.output_len for r in requests], dtype=np.float64)
        span = max(r.arrival for r in requests)
        shared = sum(r.prefix_len for r in requests if r.prefix_id >= 0)
        out |= {"duration": span, "offered_rate": len(requests) / span if span > 0 else None,
                **{name: {"mean": float(x.mean()), "p50": float(np.median(x)), "p90": float(np.percentile(x, 90))}
                   for name, x in (("prompt_len", p), ("output_len", o))},
                "shared_prefix_share": sum(r.prefix_id >= 0 for r in requests) / len(requests),
                "shared_prefix_token_share": shared / float(p.sum())}
    if isinstance(requests, Workload):
        out |= {"clipped": requests.clipped, "skipped": requests.skipped}
    return out
