"""The article's serving-cost claims at the utilization real traffic allows: `moekit plan --simulate`.

    moekit plan --simulate                     # the GPT-4 report, then these rows (minutes on 2 cores)
    moekit plan --simulate --json              # ... and the rows, capacities and curve points as JSON
    moekit plan --simulate --sim-points 8 --sim-day-all --sim-slo ttft:5000,tpot:500
    from moekit.sim.claims import SimClaimsConfig, simulated_claims
    s = simulated_claims(SimClaimsConfig(points=2, iterations=0)); [c.agrees for c in s.claims]

SPEC section 4 prices GPT-4 at $0.0049 per 1k tokens on 128 A100s and $0.0021 on 128 H100s "at high
utilization", and says poor utilization would more than double it. The planner's closed form
(moekit/plan/report.py) takes a cluster busy 100% of the time at the largest batch its memory holds, on a fixed
4k + 4k workload. Here the same deployments serve real traffic in the simulator (the engine's own scheduler on
a simulated clock, moekit/sim/simulator.py):

1. The shipped Azure conversation trace (real lengths and burstiness, moekit/sim/traces/) is time-scaled to the
   largest load one replica serves within an SLO (default: TTFT p90 <= 10 s and TPOT p90 <= 1 s: GPT-4 on 16
   pipeline stages takes ~0.3 s per token even at batch 1 on A100s, so a 100 ms TPOT is out of reach), found by
   bracketing and bisecting the time scale as `moekit sim --capacity` does the rate. Its $ per 1k output tokens,
   busy fraction and batch sit next to the closed form's and the article's.
2. A fleet sized for the peak hour (replicas = ceil(peak rate / that capacity)) serves a day whose rate follows
   `workload.daily_rate` (a cosine, trough 25% of the peak). Behind a least-loaded router at steady load the
   replicas see alike traffic, so ONE replica is simulated at `points` evenly spaced hours, each at that hour's
   rate / replicas; the day's $ per 1k = the fleet's cost for 24 h / the output tokens it serves over the day
   (the points integrated by the midpoint rule, exact for a cosine), next to the peak hour's and the closed form's.

Steady state: a replica starts empty and needs about a long request's lifetime (its 90th-percentile output x
the token time) to fill, so each window is 1.5 such lifetimes and only its last third is measured: the
latencies of the requests arriving then, the busy fraction of those seconds, and the requests/s, whose output a
replica meeting its SLO serves as it comes (served = offered at steady state; counting tokens as they stream out
would count the filling), at the trace's mean output length. $ per 1k output tokens charges the replica's whole
time (prefill included) to the output tokens, as `moekit sim` does; the closed form's output figure counts decode
time only, so its "all-in" figure (the prefill of the trace's prompts added) is shown as well.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from moekit.plan.hardware import GPU, get_gpu
from moekit.plan.layout import as_config
from moekit.plan.report import SERVE_A100, SERVE_H100, Claim, within
from moekit.plan.serve import serve
from moekit.sim import metrics
from moekit.sim import workload as wl
from moekit.sim.daycost import CurvePoint, DayCost, day_cost
from moekit.sim.metrics import SLO_METRICS

CLI_FLAGS = ("trace_duration", "window", "peak_rate", "iterations", "points")  # `moekit plan --sim-*`
TOLERANCE = 1.5  # report.py's for the same claim at busy 100%


@dataclass
class SimDeployment:
    """One replica of the simulated fleet, and the article's $ per 1k figure for it."""

    label: str
    gpu: str | GPU
    weight_dtype: str = "bf16"
    kv_dtype: str = "bf16"
    tp: int = 8
    pp: int = 16
    article: float | None = None  # the article's $ per 1k tokens on this hardware
    report: dict | None = None  # the report's closed-form scenario (report.py SERVE_*), for its figure


A100 = SimDeployment("128 A100-80GB", "A100-80GB", "bf16", "bf16", 8, 16, 0.0049, SERVE_A100)
H100 = SimDeployment("128 H100", "H100", "fp8", "fp8", 8, 16, 0.0021, SERVE_H100)


@dataclass
class SimClaimsConfig:
    model: str = "gpt4"
    deployments: tuple = (A100, H100)
    trace: str = "conv"  # conv | code | a trace file (moekit/sim/workload.py load_trace)
    trace_start: float = 0.0  # trace seconds
    trace_duration: float | None = None  # trace seconds used, repeated as needed (None: to its end, ~58 min)
    window: float | None = None  # simulated seconds of arrivals per simulation (None: 1.5 long lifetimes)
    warmup: float = 2 / 3  # share of each window before the figures are measured (one long lifetime)
    slo: dict = field(default_factory=lambda: {"ttft": 10_000.0, "tpot": 1_000.0})  # ms, at `percentile`
    percentile: float = 90.0
    step: float = 1.25  # the capacity bracket [lo, lo x step], found from the closed form's estimate
    iterations: int = 1  # bisections of the bracket (each halves it: 1.25 -> ~1.12 -> ~1.06)
    peak_rate: float = 1000.0  # the fleet's peak requests/s (~54M requests a day at a 25% trough)
    trough: float = 0.25  # the day's lowest rate, a share of the peak
    peak_hour: float = 14.0
    points: int = 4  # hours of the day simulated (the midpoint rule is exact for the cosine's mean from 2 on)
    day_all: bool = False  # the day for every deployment (default: the first, the article's $0.0049 baseline)
    memory_fraction: float = 0.9
    # Token budget per micro-batch. With 16 stages a micro-batch carrying a long prefill chunk holds up every one
    # behind it at each stage: at 8,192 (the server's default) GPT-4's pipeline idles about half its time on this
    # trace, at 2,048 (the planner's prefill chunk) it stays busy.
    max_num_batched_tokens: int = 2048
    max_num_seqs: int | None = None  # None: what the closed form keeps in flight (its batch x micro-batches)
    block_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("trace_duration", "window", "peak_rate"):
            v = getattr(self, name)
            if v is None and name != "peak_rate":
                continue
            if isinstance(v, bool) or not isinstance(v, int | float) or not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{_flag(name)} must be a number > 0, got {v!r}")
        for name, low in (("iterations", 0), ("points", 1), ("max_num_batched_tokens", 1), ("max_num_seqs", 1),
                          ("block_size", 1)):
            v = getattr(self, name)
            if v is None and name == "max_num_seqs":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{_flag(name)} must be a whole number >= {low}, got {v!r}")
        if not (self.step > 1 and math.isfinite(self.step)):
            raise ValueError(f"the capacity bracket's step must be > 1, got {self.step}")
        if not 0 <= self.trough <= 1:
            raise ValueError(f"the trough is a share of the peak rate in [0, 1], got {self.trough}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"the warm-up is a share of each window in [0, 1), got {self.warmup}")
        if not 0 < self.percentile < 100:
            raise ValueError(f"the SLO percentile must be in (0, 100), got {self.percentile}")
        if not self.slo or any(k not in SLO_METRICS or not v > 0 for k, v in self.slo.items()):
            raise ValueError(f"the SLOs must be {{metric: ms > 0}} with metrics of {', '.join(SLO_METRICS)}, "
                             f"got {self.slo}")
        if not self.deployments:
            raise ValueError("give at least one deployment to simulate")


def _flag(name: str) -> str:
    return f"--sim-{name.replace('_', '-')}" if name in CLI_FLAGS else name


def parse_slo(text: str) -> dict[str, float]:
    """'ttft:10000,tpot:1000' -> {"ttft": 10000.0, "tpot": 1000.0} (milliseconds)."""
    return metrics.parse_slo(text, "--sim-slo", "ttft:10000,tpot:1000")


# ---- one steady-state simulation ---------------------------------------------------------------------------
@dataclass
class Steady:
    """One replica's figures at steady state: the requests that arrived in [warmup_s, window_s), its bins then."""

    time_scale: float
    rate: float  # requests/s offered to the replica
    window_s: float  # simulated seconds of arrivals
    warmup_s: float
    requests: int  # measured
    latency_s: dict  # metric -> its `percentile` over the measured requests, seconds
    meets_slo: bool
    output_tokens_per_s: float  # served: measured requests/s x the trace's mean output (served = offered)
    window_output_len: float  # the measured requests' mean output (a stretch of the trace: it varies)
    streamed_tokens_per_s: float  # tokens that came out in those seconds (lower while the replica still fills)
    busy: float  # stage-seconds working / (stages x seconds)
    decoding: float  # sequences between first and last token, on average (Little's law)
    waiting: float  # requests before their first token, on average
    kv_peak: float  # peak share of the KV blocks in use
    burst: float  # the busiest minute's arrivals / the mean minute's
    cost_per_1k_output: float | None  # the replica's $/hour over its output tokens
    wall_s: float


class _Sim:
    """One deployment: its step-time model, its closed form at the trace's lengths, runs of the trace."""

    def __init__(self, c: SimClaimsConfig, d: SimDeployment, cfg, trace: list):
        from moekit.sim.steptime import HardwareModel

        self.c, self.d, self.cfg, self.trace = c, d, cfg, trace
        hw = get_gpu(d.gpu)
        out = np.array([r.output_len for r in trace], dtype=float)
        inp = np.array([r.prompt_len for r in trace], dtype=float)
        self.mean_prompt, self.mean_output = float(inp.mean()), float(out.mean())
        # The closed form at the trace's own lengths: a decoding sequence holds its prompt and half its output on
        # average, weighted by the tokens it decodes. It gives the comparison, the compute dtype (W8A8 on FP8
        # GPUs), the sequences the KV cache holds, where the capacity search starts and how long a window is.
        context = max(1, round(float((out * (inp + out / 2)).sum() / out.sum())))
        self.closed = p = serve(cfg, hw, tp=d.tp, pp=d.pp, weight_dtype=d.weight_dtype, kv_dtype=d.kv_dtype,
                                context=context, prompt_len=max(1, round(self.mean_prompt)),
                                memory_fraction=c.memory_fraction, prefill_chunk=c.max_num_batched_tokens)
        self.hw, self.n_gpus = hw, d.tp * d.pp
        self.make_model = lambda: HardwareModel(cfg, hw, tp=d.tp, pp=d.pp, weight_dtype=d.weight_dtype,
                                                kv_dtype=d.kv_dtype, compute_dtype=p.compute_dtype,
                                                memory_fraction=c.memory_fraction,
                                                prefill_chunk=c.max_num_batched_tokens, seed=c.seed)
        self.num_blocks = self.make_model().kv_tokens_capacity() // c.block_size
        # The engine may run as many sequences as the closed form keeps in flight: a lower cap (the server's
        # default 1,024) would bound the load before the hardware does.
        self.max_num_seqs = c.max_num_seqs or p.batch * p.micro_batches
        self.trace_rel = [r.arrival - trace[0].arrival for r in trace]  # sorted, from 0
        span = self.trace_rel[-1]
        # Repeated end to end: the last arrival, then one mean gap, then the first again.
        self.trace_period = span + (span / (len(trace) - 1) if len(trace) > 1 and span > 0 else 1.0)
        # Requests/s at busy 100%: prefill and decode one after the other (sequential), or prefill alone (mixed
        # steps hide decode under prefill's compute); the search starts between the two.
        sequential = 1 / (self.mean_prompt / p.input_tokens_per_s + self.mean_output / p.tokens_per_s)
        self.closed_rate = sequential
        self.start_rate = 0.9 * math.sqrt(sequential * p.input_tokens_per_s / self.mean_prompt)
        # A long request lives ~ its TTFT + its 90th-percentile output x the token time (x 2: prefill chunks share
        # the steps; measured 1.3-2.2x on GPT-4); the replica is full after one such lifetime, then half of one is
        # measured (thousands of requests).
        life = p.time_to_first_token + float(np.percentile(out, 90)) * 2 * p.token_seconds
        self.window = c.window or max(60.0, 1.5 * life)

    def closed_all_in(self) -> float | None:
        """The closed form's $ per 1k output tokens with the trace's prefill time charged to them (busy 100%)."""
        p = self.closed
        if p.cost_per_1k_output is None:
            return None
        return p.cost_per_1k_output + p.cost_per_1k_input * self.mean_prompt / self.mean_output

    def requests(self, time_scale: float, window: float) -> list:
        """`window` simulated seconds of the trace, repeated end to end and sped up `time_scale` times (arrivals
        that much more often), placed so that its start arrives when the measurement starts (after the warm-up,
        which replays the trace's end): the measured stretch always begins at the trace's start, and a faster
        trace packs a longer stretch of it into the window."""
        warm = self.c.warmup * window
        period, rel = self.trace_period, self.trace_rel
        reqs = []
        for k in range(-math.ceil(warm * time_scale / period), math.ceil((window - warm) * time_scale / period)):
            for r, tau in zip(self.trace, rel, strict=True):
                t = warm + (tau + k * period) / time_scale
                if 0 <= t < window:
                    reqs.append(wl.SimRequest(t, r.prompt_len, r.output_len))
        return reqs

    def time_scale_for(self, rate: float) -> float:
        """The speed-up at which the measured part of a window offers `rate` requests/s: it holds the trace's
        first n = rate x seconds arrivals (of the trace repeated), so the measured stretch ends between the n-th
        and the (n+1)-th. The trace's rate varies over its hour, so this is not rate / the hour's mean rate."""
        span = (1 - self.c.warmup) * self.window
        n, rel = max(1, round(rate * span)), self.trace_rel

        def at(i: int) -> float:  # the i-th arrival of the repeated trace, trace seconds
            return (i // len(rel)) * self.trace_period + rel[i % len(rel)]

        return (at(n - 1) + at(n)) / 2 / span

    def run(self, rate: float) -> Steady:
        """One replica offered `rate` requests/s of the trace, measured at steady state."""
        from moekit.sim.metrics import timeline
        from moekit.sim.simulator import Deployment, simulate

        c, window = self.c, self.window
        time_scale = self.time_scale_for(rate)
        reqs = self.requests(time_scale, window)
        if not reqs:
            raise ValueError(f"no request of the trace arrives in {window:.3g} s: lengthen --sim-window")
        dep = Deployment(replicas=1, num_blocks=self.num_blocks, block_size=c.block_size,
                         max_num_batched_tokens=c.max_num_batched_tokens, max_num_seqs=self.max_num_seqs,
                         max_model_len=self.cfg.max_seq_len, enable_prefix_caching=False)
        model = self.make_model()  # (no prefix cache: the trace shares no prompt, and hashing costs ~10% of a run)
        t0 = time.perf_counter()
        run = simulate(reqs, lambda i: model, dep, vocab=self.cfg.vocab_size, seed=c.seed,
                       bin_s=max(1.0, window / 100))
        wall = time.perf_counter() - t0
        return self._steady(run, timeline(run), time_scale, wall)

    def _steady(self, run, tl: dict, time_scale: float, wall: float) -> Steady:
        c, r, window = self.c, run.results, self.window
        warm = c.warmup * window
        arrival = np.frombuffer(r.arrival, dtype=float)
        ttft, e2el = np.frombuffer(r.ttft, dtype=float), np.frombuffer(r.e2el, dtype=float)
        n_out = np.frombuffer(r.output_len, dtype=np.int64)
        tpot = np.where(n_out > 1, (e2el - ttft) / np.maximum(n_out - 1, 1), 0.0)
        m = arrival >= warm
        if not m.any():
            raise ValueError(f"no request arrives in the measured {window - warm:.3g} s of the window: lengthen "
                             "--sim-window")
        per = {"ttft": ttft[m], "tpot": tpot[m], "e2el": e2el[m]}
        lat = {k: float(np.percentile(per[k], c.percentile)) for k in c.slo}
        ok = all(lat[k] * 1000 <= v for k, v in c.slo.items())
        t = np.asarray(tl["t"], dtype=float)
        bins = (t >= warm) & (t < window)
        bins = bins if bins.any() else t < window
        span = window - warm
        # Served = offered at steady state; the trace's mean output rather than this window's: windows at
        # different loads cover different stretches of the trace, whose lengths vary, and a day serves its mix.
        tps = float(m.sum()) / span * self.mean_output
        price = self.hw.price_per_hour
        minutes = np.bincount((arrival // 60).astype(np.int64))[: int(window // 60)]  # whole minutes only
        return Steady(
            time_scale=time_scale, rate=float(m.sum()) / span, window_s=window, warmup_s=warm,
            requests=int(m.sum()), latency_s=lat, meets_slo=ok, output_tokens_per_s=tps,
            window_output_len=float(n_out[m].mean()),
            streamed_tokens_per_s=float(np.mean(np.asarray(tl["output_tokens_per_s"])[bins])),
            busy=float(np.mean(np.asarray(tl["busy"])[bins])),
            decoding=float(m.sum()) / span * float(np.mean(e2el[m] - ttft[m])),
            waiting=float(m.sum()) / span * float(np.mean(ttft[m])),
            kv_peak=float(np.max(np.asarray(tl["kv_occupancy"])[bins])),
            burst=float(minutes.max() / minutes.mean()) if minutes.size and minutes.mean() > 0 else 1.0,
            cost_per_1k_output=None if price is None else self.n_gpus * price / 3600 / tps * 1000, wall_s=wall)


def _say(progress, label: str, s: Steady, percentile: float) -> None:
    if progress is not None:
        lat = " | ".join(f"{k.upper()} p{percentile:g} {v:.2f} s" for k, v in s.latency_s.items())
        progress(f"sim {label}: trace x{s.time_scale:.3g} = {s.rate:.2f} req/s | {lat} | busy {s.busy:.0%} | "
                 f"{'meets' if s.meets_slo else 'misses'} the SLO | {s.wall_s:.0f} s")


# ---- 1. capacity within the SLO ----------------------------------------------------------------------------
@dataclass
class Capacity:
    deployment: str
    time_scale: float  # the trace's speed-up at that load
    rate: float  # the largest requests/s found that one replica serves within the SLO
    at: Steady  # the figures at that load
    trials: list[dict]
    closed_rate: float  # requests/s at busy 100%, prefill then decode (the closed form)
    closed_per_1k: float | None  # closed form at the trace's lengths, busy 100%, decode time only
    closed_all_in: float | None  # ... with the prefill time for the trace's prompts charged to the output
    closed_batch: int  # the largest batch per micro-batch the KV cache holds at the trace's context
    micro_batches: int
    report_per_1k: float | None  # report.py's figure: 4k + 4k, busy 100%
    article: float | None
    bound_by: list[str] = field(default_factory=list)  # the SLOs the lightest failing load broke
    failed_rate: float = math.nan  # that load, requests/s


def capacity(sim: _Sim, progress=None, max_moves: int = 12) -> Capacity:
    """The largest rate (the trace time-scaled to it) whose steady state meets every SLO (they fail as the load
    rises): from the closed form's estimate, steps of `step` up or down to a bracket [lo, lo x step], then
    `iterations` bisections (geometric)."""
    c, d = sim.c, sim.d
    trials: list[dict] = []
    best: Steady | None = None

    def ok(rate: float) -> bool:
        nonlocal best
        s = sim.run(rate)
        _say(progress, d.label, s, c.percentile)
        trials.append({"target_rate": rate, "rate": s.rate, "time_scale": s.time_scale, "latency_s": s.latency_s,
                       "busy": s.busy, "meets_slo": s.meets_slo})
        if s.meets_slo and (best is None or s.rate > best.rate):
            best = s
        return s.meets_slo

    rate = sim.start_rate
    good = ok(rate)
    for _ in range(max_moves):
        nxt = rate * c.step if good else rate / c.step
        if ok(nxt) != good:
            lo, hi = (rate, nxt) if good else (nxt, rate)
            break
        rate = nxt
    else:
        what = ("holds at every load tried: the window is too short to load the replica" if good else
                "fails even at the lightest load tried: relax --sim-slo or use more GPUs per replica")
        raise ValueError(f"{d.label}: the SLO ({_slo_text(c)}) {what} ({rate:.3g} req/s)")
    for _ in range(c.iterations):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    p = sim.closed
    rep = serve(**d.report).cost_per_1k_output if d.report else None
    failed = min((t for t in trials if not t["meets_slo"]), key=lambda t: t["rate"])
    bound = [k for k, v in failed["latency_s"].items() if v * 1000 > c.slo[k]]
    return Capacity(d.label, best.time_scale, best.rate, best, trials, sim.closed_rate, p.cost_per_1k_output,
                    sim.closed_all_in(), p.batch, p.micro_batches, rep, d.article, bound, failed["rate"])


# ---- 2. a day's load curve ---------------------------------------------------------------------------------
@dataclass
class Day:
    deployment: str
    replicas: int
    points: list[CurvePoint]
    cost: DayCost | None  # None without a price for the GPU


def daily(sim: _Sim, cap: Capacity, progress=None) -> Day:
    """The fleet sized for the peak, one replica simulated at `points` hours of the day."""
    c = sim.c
    replicas = math.ceil(c.peak_rate / cap.rate)
    points = []
    for k in range(c.points):  # evenly spaced from the peak hour: the midpoint rule
        hour = (c.peak_hour + 24 * k / c.points) % 24
        rate = wl.daily_rate(hour * 3600, c.peak_rate, trough=c.trough, peak_hour=c.peak_hour) / replicas
        s = sim.run(rate)
        _say(progress, f"{sim.d.label} at {hour:g} h", s, c.percentile)
        points.append(CurvePoint(hour, 24 / c.points, s.rate, s.output_tokens_per_s, s.busy, s.meets_slo,
                                 s.latency_s))
    price = sim.hw.price_per_hour
    cost = day_cost(points, replicas, sim.n_gpus, price) if price is not None else None
    return Day(sim.d.label, replicas, sorted(points, key=lambda p: p.hour), cost)


# ---- the claims --------------------------------------------------------------------------------------------
@dataclass
class SimClaims:
    config: dict
    capacities: list[Capacity]
    days: list[Day]
    claims: list[Claim]
    wall_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def _slo_text(c: SimClaimsConfig) -> str:
    return " and ".join(f"{k.upper()} p{c.percentile:g} <= {v / 1000:g} s" for k, v in c.slo.items())


def _money(x: float | None) -> str:
    return "n/a" if x is None else f"${x:.4f}" if x >= 1e-3 else f"${x:.2g}"


def _why(s: Steady, cap: Capacity, c: SimClaimsConfig) -> str:
    """What stops the load below 100% busy, from the figures at capacity."""
    bound = ", ".join(k.upper() for k in cap.bound_by)
    kv = "the KV cache (full)" if s.kv_peak >= 0.9 else f"not the KV cache ({s.kv_peak:.0%} at most)"
    return (f"what stops the load: {bound} (broken at {cap.failed_rate:.3g} req/s); "
            f"{kv}; the rest of the pipeline's time is fill and bubbles "
            f"(a micro-batch with a prefill chunk holds up the {cap.micro_batches - 1} behind it at every stage) and "
            f"headroom for bursts (the busiest minute {s.burst:.2f}x the mean)")


def _capacity_claim(caps: list[Capacity], c: SimClaimsConfig, trace_name: str, sims: list[_Sim]) -> Claim:
    parts, agrees = [], True
    for cap in caps:
        s = cap.at
        parts.append(
            f"{cap.deployment} {_money(s.cost_per_1k_output)} per 1k output tokens at {cap.rate:.1f} req/s per "
            f"replica (the trace x{cap.time_scale:.2f}; the closed form's busy-100% load, prefill then decode, is "
            f"{cap.closed_rate:.1f}" + ("; above it: mixed steps hide decode under prefill"
                                        if cap.rate > cap.closed_rate else "") + f"): busy {s.busy:.0%}, "
            f"~{s.decoding / cap.micro_batches:.0f} sequences per micro-batch where the KV cache holds "
            f"{cap.closed_batch}; p{c.percentile:g} TTFT "
            f"{s.latency_s.get('ttft', math.nan):.1f} s, TPOT {s.latency_s.get('tpot', math.nan):.2f} s; closed "
            f"form at busy 100%: {_money(cap.report_per_1k)} (the report's 4k+4k), {_money(cap.closed_per_1k)} "
            f"at the trace's lengths ({_money(cap.closed_all_in)} with their prefill); {_why(s, cap, c)}")
        if cap.article is not None:
            agrees &= s.cost_per_1k_output is not None and within(s.cost_per_1k_output, cap.article, TOLERANCE)
    if len(caps) >= 2 and caps[0].at.cost_per_1k_output and caps[1].at.cost_per_1k_output:
        ratio = caps[0].at.cost_per_1k_output / caps[1].at.cost_per_1k_output
        parts.append(f"{caps[1].deployment} {ratio:.1f}x cheaper than {caps[0].deployment} (article "
                     f"{caps[0].article / caps[1].article:.1f}x)" if caps[0].article and caps[1].article else
                     f"{caps[1].deployment} {ratio:.1f}x cheaper than {caps[0].deployment}")
        agrees &= ratio >= 2
    return Claim(
        "4", "$0.0049 / $0.0021 per 1k tokens at the utilization real traffic allows (simulated)",
        "$0.0049 / $0.0021 at high utilization", "; ".join(parts),
        f"the Azure {trace_name} trace (real lengths: mean {sims[0].mean_prompt:.0f} prompt + "
        f"{sims[0].mean_output:.0f} output tokens; real burstiness) time-scaled to the largest load one replica "
        f"serves with {_slo_text(c)} (bracketed in steps of {c.step:g}, {c.iterations} bisection(s)); engine: "
        f"{c.max_num_batched_tokens}-token budget per micro-batch, as many sequences as the closed form's batch; "
        f"steady state ({sims[0].window:.0f} s windows on {caps[0].deployment}, the last {1 - c.warmup:.0%} "
        f"measured); the replica's whole time charged to output tokens; agrees: within {TOLERANCE:g}x of the article"
        + (f" and {caps[1].deployment} >= 2x cheaper than {caps[0].deployment}" if len(caps) >= 2 else "")
        + ", as the report holds its busy-100% figure",
        agrees, caps[0].at.cost_per_1k_output)


def _day_claim(days: list[Day], caps: list[Capacity], sims: list[_Sim], c: SimClaimsConfig) -> Claim:
    parts, agrees, value = [], True, None
    for day, cap in zip(days, caps, strict=False):
        if day.cost is None:
            parts.append(f"{day.deployment}: no price in the hardware table")
            agrees = False
            continue
        k = day.cost
        busy = [p.busy for p in day.points]
        missed = [f"{p.hour:g} h" for p in day.points if not p.meets_slo]
        vs_closed = k.day_per_1k / cap.closed_all_in if cap.closed_all_in else math.nan
        value = vs_closed if value is None else value
        agrees &= vs_closed > 2
        slack = day.replicas * cap.rate / c.peak_rate
        parts.append(
            f"{day.deployment}: {day.replicas} replica(s) for {c.peak_rate:g} req/s at {c.peak_hour:g} h "
            f"({slack:.2f}x the peak's need); the day {_money(k.day_per_1k)} per 1k output tokens = "
            f"{vs_closed:.2f}x the closed form at busy 100% ({_money(cap.closed_all_in)} with prefill)"
            + (f", {k.day_per_1k / cap.article:.2f}x the article's {_money(cap.article)}" if cap.article else "")
            + f"; the peak hour "
            f"{_money(k.peak_per_1k)} ({k.peak_per_1k / cap.closed_all_in:.2f}x busy 100%), the day {k.ratio:.2f}x "
            f"it; busy {min(busy):.0%}-{max(busy):.0%} over the "
            "day" + (f"; the SLO missed at {', '.join(missed)}" if missed else "; the SLO met at every point"))
    return Claim(
        "4", "Poor utilization would more than double the cost: a day's load curve (simulated)", "> 2x",
        "; ".join(parts) + f". The day against its own peak hour is at most peak / mean rate = 2 / (1 + trough) "
        f"= {2 / (1 + c.trough):.2f}x, which no cosine day passes; the peak hour against busy 100% (the SLO's "
        "headroom, whole replicas, prefill overlapping decode) makes the rest",
        f"a fleet sized for the peak: ceil(peak / the capacity above); rate = daily_rate, a cosine with its trough "
        f"{c.trough:.0%} of the peak at {(c.peak_hour + 12) % 24:g} h; one replica simulated at {c.points} hours "
        f"({sims[0].window:.0f} s each) at the fleet's rate / replicas (a least-loaded router at steady load makes "
        f"the replicas alike); tokens integrated by the midpoint rule; agrees: the day's $ per 1k > 2x the closed "
        f"form's at busy 100% (the article's high utilization) for the same traffic",
        agrees, value)


def simulated_claims(config: SimClaimsConfig | None = None,
                     progress: Callable[[str], None] | None = None) -> SimClaims:
    """Both claims for the deployments of `config` (default: GPT-4 on 128 A100-80GB and 128 H100); the day's
    curve for the first (or, with `day_all`, every) deployment."""
    c = config or SimClaimsConfig()
    t0 = time.perf_counter()
    cfg = as_config(c.model)
    path = wl.resolve_trace(c.trace)
    trace = list(wl.load_trace(path, start=c.trace_start, duration=c.trace_duration, max_len=cfg.max_seq_len))
    if not trace:
        raise ValueError(f"trace {c.trace}: no request from {c.trace_start:g} s on; give an earlier --sim-trace-start")
    sims = [_Sim(c, d, cfg, trace) for d in c.deployments]
    caps = [capacity(s, progress) for s in sims]
    n_days = len(sims) if c.day_all else 1
    days = [daily(s, cap, progress) for s, cap in zip(sims[:n_days], caps[:n_days], strict=True)]
    name = c.trace if c.trace in wl.TRACE_FILES else path.name
    claims = [_capacity_claim(caps, c, name, sims), _day_claim(days, caps, sims, c)]
    conf = asdict(c)
    conf["deployments"] = [{**asdict(d), "gpu": get_gpu(d.gpu).name} for d in c.deployments]
    return SimClaims(conf, caps, days, claims, time.perf_counter() - t0)


def format_claims(s: SimClaims, first: int = 1) -> str:
    """The rows in the report's style (moekit/plan/report.py format_report), numbered from `first`."""
    title = "4s. Inference under real traffic (simulated: moekit plan --simulate)"
    lines = ["", title, "-" * len(title)]
    for i, c in enumerate(s.claims, first):
        lines += [f"[{i}] {c.claim}  ({'agrees' if c.agrees else 'DISAGREES'})",
                  f"    article: {c.article}", f"    moekit:  {c.moekit}", f"    assumes: {c.assumptions}"]
    lines += ["", f"{sum(c.agrees for c in s.claims)} of {len(s.claims)} simulated claims agree ({s.wall_s:.0f} s "
                  "of simulation; every run's figures: `moekit plan --simulate --json`)."]
    return "\n".join(lines)


def stderr_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


__all__ = ["A100", "H100", "Capacity", "CurvePoint", "Day", "DayCost", "SimClaims", "SimClaimsConfig",
           "SimDeployment", "Steady", "capacity", "day_cost", "daily", "format_claims", "parse_slo",
           "simulated_claims", "stderr_progress"]
