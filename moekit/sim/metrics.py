"""A simulated run's figures, in `moekit bench serve`'s definitions (vLLM's `vllm bench serve`), plus what only a
simulator sees: utilization, KV occupancy, preemptions, expert load and dollars per 1k tokens.

- TTFT: arrival -> first token; ITL: every gap between two tokens of a request; TPOT per request:
  (E2EL - TTFT) / (output tokens - 1); E2EL: arrival -> last token; mean, median, std and percentiles in ms.
- Throughputs divide by the duration (first arrival -> last token); goodput counts requests meeting every SLO.
- Utilization: compute = FLOPs done / (GPUs x peak x duration); bandwidth = HBM bytes read / (GPUs x peak
  bandwidth x duration); busy = stage-seconds working / (stages x duration) (the pipeline's fill, bubbles and
  idle gaps all count against it).
- $ per 1k tokens = GPUs x $/GPU-hour x duration / (tokens / 1000): the price at the utilization this traffic
  allowed, where the planner assumes a busy cluster (SPEC section 4: "high utilization").
"""

from __future__ import annotations

import math

import numpy as np

SLO_METRICS = ("ttft", "tpot", "e2el")


def parse_slo(text: str | None, flag: str = "--slo", example: str = "ttft:2000,tpot:300") -> dict[str, float]:
    """'ttft:2000,tpot:300' -> {"ttft": 2000.0, "tpot": 300.0} (milliseconds); a ValueError naming `flag`."""
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        name, sep, value = item.strip().partition(":")
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if not sep or name not in SLO_METRICS or not ms > 0 or not math.isfinite(ms):
            raise ValueError(f"{flag} {text!r}: give METRIC:MS[,METRIC:MS] with METRIC one of "
                             f"{', '.join(SLO_METRICS)} and MS > 0, e.g. {example}")
        out[name] = ms
    return out


def _stats(name: str, values, percentiles) -> dict:
    ms = np.asarray(values if len(values) else [0.0], dtype=float) * 1000
    out = {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
           f"std_{name}_ms": float(ms.std())}
    for p in percentiles:
        out[f"p{p:g}_{name}_ms"] = float(np.percentile(ms, p))
    return out


def summarize(run, slos: dict[str, float], percentiles, price_per_gpu_hour=None, peak_flops=None,
              peak_bandwidth=None) -> dict:
    r = run.results
    ttft, e2el = np.frombuffer(r.ttft, dtype=float), np.frombuffer(r.e2el, dtype=float)
    out_len = np.frombuffer(r.output_len, dtype=np.int64)
    in_len = np.frombuffer(r.prompt_len, dtype=np.int64)
    tpot = np.where(out_len > 1, (e2el - ttft) / np.maximum(out_len - 1, 1), 0.0)
    duration = run.duration or 1e-12
    total_in, total_out = int(in_len.sum()), int(out_len.sum())
    s = {"completed": len(r), "failed": run.n_requests - len(r), "duration": duration,
         "total_input_tokens": total_in, "total_output_tokens": total_out,
         "request_throughput": len(r) / duration, "output_throughput": total_out / duration,
         "total_token_throughput": (total_in + total_out) / duration}
    if slos:
        per = {"ttft": ttft, "tpot": tpot, "e2el": e2el}
        ok = np.ones(len(r), dtype=bool)
        for k, v in slos.items():
            ok &= per[k] * 1000 <= v
        s["request_goodput"] = float(ok.sum()) / duration
        s["slo_attainment"] = float(ok.mean()) if len(r) else 0.0
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", np.frombuffer(r.itl, dtype=float)),
                         ("e2el", e2el)):
        s |= _stats(name, values, percentiles)

    reps = run.replicas
    stages = reps[0].model.num_stages
    n_gpus = run.n_gpus_per_replica * len(reps)
    steps = sum(x.steps for x in reps)
    sim = {"replicas": len(reps), "gpus": n_gpus, "model": run.model_info,
           "steps": steps, "mean_batch_seqs": sum(x.batch_seqs for x in reps) / max(steps, 1),
           "mean_batch_tokens": sum(x.tokens for x in reps) / max(steps, 1),
           "busy": sum(x.stage_busy for x in reps) / (stages * len(reps) * duration),
           "preemptions": sum(x.scheduler.num_preemptions for x in reps),
           "prefix_cache_hit_rate": (sum(x.kv.hits for x in reps) / max(1, sum(x.kv.queries for x in reps))),
           "kv_blocks": reps[0].kv.num_blocks,
           "kv_occupancy_peak": max((b[2] for x in reps for b in x.bins.values()), default=0) / reps[0].kv.num_blocks,
           "requests_per_replica": np.bincount(np.frombuffer(r.replica, dtype=np.int64),
                                               minlength=len(reps)).tolist(),
           "wall_s": run.wall_s, "sim_requests_per_wall_s": len(r) / max(run.wall_s, 1e-9),
           "clipped": run.clipped}
    if reps[0].model.num_stages and getattr(reps[0].model, "cfg", None) is not None and reps[0].model.cfg.is_moe:
        sim["experts_touched_per_layer"] = sum(x.touched for x in reps) / max(steps, 1)
    if peak_flops:
        sim["compute_utilization"] = sum(x.flops for x in reps) / (n_gpus * peak_flops * duration)
    if peak_bandwidth:
        sim["bandwidth_utilization"] = sum(x.bytes for x in reps) / (n_gpus * peak_bandwidth * duration)
    if price_per_gpu_hour is not None:
        dollars = n_gpus * price_per_gpu_hour * duration / 3600
        sim["cost_dollars"] = dollars
        sim["cost_per_1k_output"] = dollars / max(total_out, 1) * 1000
        sim["cost_per_1k_tokens"] = dollars / max(total_in + total_out, 1) * 1000
    s["sim"] = sim
    return s


def timeline(run) -> dict:
    """Per bin of `bin_s` seconds, over all replicas: busy fraction, output tokens/s, peak KV occupancy."""
    reps = run.replicas
    bin_s = reps[0].bin_s
    keys = sorted({k for x in reps for k in x.bins})
    stages = reps[0].model.num_stages
    busy, tps, kv = [], [], []
    for k in keys:
        bs = [x.bins.get(k, [0, 0, 0, 0]) for x in reps]
        busy.append(min(1.0, sum(b[0] for b in bs) / (stages * len(reps) * bin_s)))
        tps.append(sum(b[1] for b in bs) / bin_s)
        kv.append(max(b[2] for b in bs) / reps[0].kv.num_blocks)
    return {"t": [k * bin_s for k in keys], "busy": busy, "output_tokens_per_s": tps, "kv_occupancy": kv}
