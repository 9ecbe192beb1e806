"""Decode throughput of a sharded model at batch 1 and 16 concurrent requests: one process x 2 threads against
tp2 and pp2 workers (2 gloo processes x 1 thread each), with the planner's prediction beside each figure, the share
of each step spent in communication, and what limits each figure.

    python bench/parallel_serve.py                         # gpt4-mini, ~3 min on 2 cores; prints one JSON object
    python bench/parallel_serve.py --quick                 # tiny, 16 tokens, one round: a smoke test (~30 s)
    python bench/parallel_serve.py --preset tiny --tokens 32 --json-out serve.json

Every run is moekit's own Engine (fp32, random weights from `init_weights(seed=0)`, greedy, ignore_eos) on
--concurrency prompts of --prompt-len random tokens, each generating --tokens tokens (decode-dominated):
- 1x2threads: the Engine over the in-memory model in this process, torch.set_num_threads(2);
- tp2 / pp2: the same weights saved as a run folder (config.json + model.safetensors) and served by a
  `moekit.infer.executor.WorkerGroup` of 2 workers (`moekit.infer.worker`, OMP_NUM_THREADS=1 each); this
  process keeps the scheduler and the sampler, with 1 thread, so that it competes as little as it can. With pp2 the
  engine keeps 2 steps in flight (two micro-batches of ceil(n / 2) requests), so one request cannot be pipelined.
All three engines are up at once and the runs are interleaved round by round (--repeats rounds, each configuration
and workload once per round, after one warm-up each), so that the machine's drift hits them alike; figures are
medians over the rounds.

Per configuration and workload:
- decode_tok_s: generated tokens after every request's first one / the time after the last first token (decode
  only, the planner's figure); tok_s the end-to-end rate with the prefill; step_ms_median the median
  `engine.step()` wall time over the decode steps (one completed forward; with pp2 one micro-batch);
  token_interval_ms one request's time between its tokens;
- predicted: `moekit.plan.serve(cfg, gpu=<this machine>, tp, pp, batch, micro_batches, context=prompt + tokens/2,
  fp32)`: total and per-user tokens/s and the slowest stage's step split into compute, memory, communication,
  per-layer overhead and the pipeline hop, beside the measured figures as measured / predicted. The hardware entry
  is measured in this run (`moekit.bench_hardware.measure`, what `moekit bench hardware` writes) at 2 threads for
  the baseline and at 1 thread for a worker; its link figures (all-reduce latency and bandwidth, the one-way hop
  latency) come from a 2-process gloo probe in the same run, the way bench/parallel_train.py probes gloo.
  --hardware local plans with the cached `moekit bench hardware` entry instead (both thread counts alike).
- comm: each worker's `collective_share` (time inside all-reduces / step time, over the steps the worker runs inside
  a CollectiveCounter, every 16th: moekit/infer/worker.py; the counter waits for every collective, so
  those steps are a little slower than the others) for this workload's runs only; the calls and payload of one such
  step against the planned 2 all-reduces per layer of the step's activations; worker_in_step_share: each worker's
  time inside `Worker.step` / the runs' wall time (stage 1's step includes waiting for stage 0's activations), and
  worker_idle_share = 1 - the largest: time the busiest worker waited for the driver (scheduling, sampling,
  pickling the step out and the logits back, none of which the planner's one-process step overhead includes). A
  pipeline hop's send and receive are counted but not timed (the counter cannot wait for them without deadlock).
- profile (the baseline): the operators that take its decode steps (torch.profiler, self CPU time, a few steps
  after the rounds): where one process's step goes, and so what a worker's half of it is made of;
- limits: what bounds the figure, in words, with the numbers that say so. A sharded step that waits tens of
  milliseconds with no worker computing while the reply is over 16 KB is named a transport stall (the reply's
  header and body go out in two writes, and Nagle's algorithm waits for the driver's delayed ACK).
Gloo on two shared cores is no place to chase speed (DESIGN.md): the figures say what each layout costs here and
why; `on_h100` is what the planner says the same layout and batch give on H100s (bf16), for scale.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2)}  # name -> (tp, pp)
BASE = "1x2threads"
PROBE_BYTES = (4 << 10, 4 << 20)  # decode payloads are 2-32 KB (latency); the large one gives the bandwidth
ACT_BYTES = 4  # fp32 activations travel between the workers (the planner prices bf16: moekit.plan.serve.ACT_BYTES)


# ---- the gloo probe (2 processes of this file) ------------------------------------------------------------------
def probe_rank(args) -> None:
    """Time all-reduce and a send/recv ping-pong at PROBE_BYTES: (latency, GB/s) per kind; rank 0 writes them."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank = args.probe_rank
    dist.init_process_group("gloo", init_method=args.probe_init, rank=rank, world_size=2)
    try:
        def ping(t):  # one round trip; half of it is one hop
            if rank == 0:
                dist.send(t, 1)
                dist.recv(t, 1)
            else:
                dist.recv(t, 0)
                dist.send(t, 0)

        calls = {"all_reduce": (lambda t: dist.all_reduce(t), 1), "p2p": (ping, 2)}
        fits = {}
        for kind, (call, per_call) in calls.items():
            times = []
            for size in PROBE_BYTES:
                t = torch.zeros(size // 4)  # zeros: a sum of them stays finite however often it runs
                n = 100 if size < (1 << 20) else 5
                call(t)
                runs = []
                for _ in range(5):
                    dist.barrier()
                    t0 = time.perf_counter()
                    for _ in range(n):
                        call(t)
                    runs.append((time.perf_counter() - t0) / n / per_call)
                times.append(statistics.median(runs))
            (s0, s1), (t0_, t1) = PROBE_BYTES, times
            per_byte = max((t1 - t0_) / (s1 - s0), 1e-15)
            fits[kind] = {"latency_us": round(max(t0_ - s0 * per_byte, 0.0) * 1e6, 1),
                          "gb_s": round(1e-9 / per_byte, 3),
                          "seconds_at": {str(s): t for s, t in zip(PROBE_BYTES, times, strict=True)}}
        if rank == 0:
            Path(args.probe_out).write_text(json.dumps(fits))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_probe(timeout: float = 300) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "probe.json"
        init = f"tcp://127.0.0.1:{_free_port()}"
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--probe-rank", str(r),
                                   "--probe-init", init, "--probe-out", str(out)], env=env, cwd=ROOT,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for r in range(2)]
        try:
            logs = [p.communicate(timeout=timeout)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if any(p.returncode for p in procs):
            raise RuntimeError("the gloo probe failed:\n" + "\n".join(log[-2000:] for log in logs))
        return json.loads(out.read_text())


# ---- the planner ----------------------------------------------------------------------------------------------
def hardware(args, probe: dict) -> tuple[dict, dict]:
    """(entries by thread count, what they are). Each gets the probed gloo link as its 'NVLink' (2 per node)."""
    from moekit.bench_hardware import measure
    from moekit.plan.hardware import get_gpu, local_hardware_path

    how = {}
    entries = {}
    if args.hardware == "local":
        try:
            local = get_gpu("local")
            entries = {2: local, 1: local}
            how["entry"] = f"the cached `moekit bench hardware` entry {local_hardware_path()} for both thread counts"
        except ValueError as e:
            how["local_missing"] = f"{e}; measured in this run instead"
    if not entries:
        before = torch.get_num_threads()
        for threads in (2, 1):
            torch.set_num_threads(threads)
            entries[threads] = measure("cpu", quick=args.quick, label=f"local-cpu-{threads}t")
        torch.set_num_threads(before)
        how["entry"] = ("measured in this run by moekit.bench_hardware.measure (what `moekit bench hardware` "
                        "writes): 2 threads for the baseline, 1 thread for each worker")
    ar, p2p = probe["all_reduce"], probe["p2p"]
    link = dict(nvlink_gb_s=ar["gb_s"] * 2 * (2 - 1) / 2,  # the planner's ring time is 2 (n-1)/n x bytes / link
                internode_gb_s=ar["gb_s"], gpus_per_node=2, allreduce_latency_us=ar["latency_us"],
                hop_latency_us=p2p["latency_us"])
    entries = {k: e.replace(**link) for k, e in entries.items()}
    how["link"] = "the gloo probe of this run: all-reduce latency and GB/s, the send/recv one-way latency"
    how["entries"] = {f"{k}_threads": {f: getattr(e, f) for f in (
        "hbm_gb_s", "gemv_gb_s", "tflops", "layer_overhead_us", "step_overhead_us", "allreduce_latency_us",
        "hop_latency_us", "nvlink_gb_s")} for k, e in entries.items()}
    return entries, how


def micro_batches(n: int, pp: int) -> tuple[int, int]:
    """(sequences per micro-batch, micro-batches in flight) as the engine schedules n requests over pp stages."""
    if pp == 1:
        return n, 1
    per = max(1, math.ceil(n / pp))  # moekit/infer/engine.py `_schedule`
    return per, math.ceil(n / per)


def predict(cfg, hw, tp: int, pp: int, n: int, context: int, prompt_len: int) -> dict:
    from moekit.plan.serve import serve

    batch, m = micro_batches(n, pp)
    p = serve(cfg, gpu=hw, n_gpus=tp * pp, tp=tp, pp=pp, weight_dtype="fp32", kv_dtype="fp32",
              compute_dtype="fp32", batch=batch, micro_batches=m, context=context, prompt_len=prompt_len)
    d = p.decode
    return {"tok_s": p.tokens_per_s, "tok_s_per_user": p.tokens_per_s_per_user, "token_ms": p.token_seconds * 1e3,
            "batch": batch, "micro_batches": m,
            "slowest_stage_ms": {"compute": d.compute_s * 1e3, "memory": d.memory_s * 1e3, "comm": d.comm_s * 1e3,
                                 "overhead": d.overhead_s * 1e3, "hop": d.hop_s * 1e3, "step": d.seconds * 1e3},
            "step_overhead_ms": hw.step_overhead_us * 1e-3,
            "comm_share": (d.comm_s + d.hop_s) / (d.seconds + d.hop_s) if d.seconds + d.hop_s else 0.0}


def on_h100(cfg, tp: int, pp: int, n: int, context: int, prompt_len: int) -> dict:
    from moekit.plan.serve import serve

    batch, m = micro_batches(n, pp)
    p = serve(cfg, gpu="H100", n_gpus=tp * pp, tp=tp, pp=pp, batch=batch, micro_batches=m, context=context,
              prompt_len=prompt_len)
    d = p.decode
    return {"tok_s": round(p.tokens_per_s, 1), "tok_s_per_user": round(p.tokens_per_s_per_user, 1),
            "comm_share": round((d.comm_s + d.hop_s) / (d.seconds + d.hop_s), 3) if d.seconds + d.hop_s else 0.0}


# ---- running ----------------------------------------------------------------------------------------------------
def save_run(folder: Path, model) -> None:
    """A run folder the workers load (moekit.infer.loader.RunReader): config.json and model.safetensors."""
    from safetensors.torch import save_file

    from moekit.resolve import save_config

    folder.mkdir(parents=True)
    save_config(model.cfg, folder / "config.json")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()
               if not (k == "lm_head.weight" and model.cfg.tie_embeddings)}, folder / "model.safetensors")


def prompts(cfg, n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, cfg.vocab_size, (length,), generator=g).tolist() for _ in range(n)]


STAT_KEYS = ("steps", "step_seconds", "tokens", "counted_steps", "counted_seconds", "collective_seconds")


def run_once(engine, batch: list[list[int]], tokens: int, group=None) -> dict:
    """All requests at once, stepped to the end: wall and decode times, decode step times, the workers' deltas."""
    from moekit.infer.sampler import SamplingParams

    before = group.metrics() if group is not None else None
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in batch]
    steps = []
    t0 = time.perf_counter()
    t_first = None
    while engine.has_unfinished():
        ts = time.perf_counter()
        engine.step()
        te = time.perf_counter()
        if t_first is not None:
            steps.append(te - ts)
        elif all(engine.requests[i].num_output_tokens > 0 for i in ids if i in engine.requests):
            t_first = te
    t1 = time.perf_counter()
    for i in ids:
        engine.result(i)
    out = {"seconds": t1 - t0, "tok_s": len(batch) * tokens / (t1 - t0),
           "decode_tok_s": len(batch) * (tokens - 1) / (t1 - t_first), "decode_seconds": t1 - t_first,
           "steps": steps}
    if group is not None:
        after = group.metrics()
        out["workers"] = [{**{k: a[k] - b[k] for k in STAT_KEYS}, "last_counted": a["last_counted"],
                           "pp_rank": a["pp_rank"], "tp_rank": a["tp_rank"]}
                          for a, b in zip(after, before, strict=True)]
    return out


def profile_decode(engine, batch: list[list[int]], tokens: int, steps: int = 6) -> dict:
    """The operators that take one process's decode steps (torch.profiler, self CPU time): what bounds the baseline,
    and, on one thread and half the matrices, each worker's compute."""
    from torch.profiler import ProfilerActivity, profile

    from moekit.infer.sampler import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in batch]
    while any(engine.requests[i].num_output_tokens == 0 for i in ids if i in engine.requests):
        engine.step()  # the prefill, not profiled
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's start/stop lines and its "no GPU" complaint
    for _ in range(2):  # the first profile pays the profiler's start-up: keep the second
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                if engine.has_unfinished():
                    engine.step()
        wall = time.perf_counter() - t0
    while engine.has_unfinished():
        engine.step()
    for i in ids:
        engine.result(i)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops) or 1.0
    return {"steps": steps, "step_ms_profiled": round(wall / steps * 1e3, 3),
            "top_ops_self_share": {e.key: round(e.self_cpu_time_total / total, 3) for e in ops[:4]},
            "top_ops_ms_per_step": {e.key: round(e.self_cpu_time_total / 1e3 / steps, 3) for e in ops[:4]}}


def summarize(runs: list[dict], n: int, tokens: int) -> dict:
    steps = [s for r in runs for s in r["steps"]]
    decode = statistics.median(r["decode_tok_s"] for r in runs)
    row = {"decode_tok_s": round(decode, 2), "tok_s": round(statistics.median(r["tok_s"] for r in runs), 2),
           "decode_tok_s_per_user": round(decode / n, 2),
           "step_ms_median": round(statistics.median(steps) * 1e3, 3) if steps else None,
           "tokens_per_step": round(n * (tokens - 1) / len(steps) * len(runs), 2) if steps else None,
           "token_interval_ms": round(statistics.median(r["decode_seconds"] / (tokens - 1) for r in runs) * 1e3, 3),
           "decode_tok_s_runs": [round(r["decode_tok_s"], 2) for r in runs]}
    if "workers" in runs[0]:
        wall = sum(r["seconds"] for r in runs)
        workers = []
        for w in range(len(runs[0]["workers"])):
            tot = {k: sum(r["workers"][w][k] for r in runs) for k in STAT_KEYS}
            last = runs[-1]["workers"][w]["last_counted"]
            plain = tot["steps"] - tot["counted_steps"]
            workers.append({
                "pp_rank": runs[0]["workers"][w]["pp_rank"], "tp_rank": runs[0]["workers"][w]["tp_rank"],
                "steps": tot["steps"], "counted_steps": tot["counted_steps"],
                "collective_share": round(tot["collective_seconds"] / tot["counted_seconds"], 4)
                if tot["counted_seconds"] else None,
                "in_step_share": round(tot["step_seconds"] / wall, 4),
                "step_ms": round((tot["step_seconds"] - tot["counted_seconds"]) / plain * 1e3, 3) if plain else None,
                "counted_step_ms": round(tot["counted_seconds"] / tot["counted_steps"] * 1e3, 3)
                if tot["counted_steps"] else None,
                "idle_ms_per_step": round((wall - tot["step_seconds"]) / tot["steps"] * 1e3, 3)
                if tot["steps"] else None,
                "counted_step": None if last is None else {
                    "tokens": last["tokens"], "logit_rows": last["logit_rows"], "calls": last["calls"],
                    "payload_bytes": last["payload"], "collective_ms": round(last["seconds"] * 1e3, 3),
                    "step_ms": round(last["step_seconds"] * 1e3, 3)}})
        row["workers"] = workers
    return row


def comm_summary(row: dict, cfg, tp: int, pp: int, pred: dict, probe: dict) -> dict:
    """The measured communication beside the planned: shares, calls and bytes of one counted step, and a worker's
    step split into collectives and the rest, against the planner's split."""
    workers = row.pop("workers")
    shares = [w["collective_share"] for w in workers]
    busy = [w["in_step_share"] for w in workers]
    busiest = max(workers, key=lambda w: w["in_step_share"])
    share = max((s for s in shares if s is not None), default=None)
    st = pred["slowest_stage_ms"]
    out = {"collective_share": shares, "collective_share_max": share,
           "predicted_comm_share": round(pred["comm_share"], 4), "worker_in_step_share": busy,
           "worker_idle_share": round(1 - max(busy), 4), "idle_ms_per_step": busiest["idle_ms_per_step"]}
    step = workers[0]["counted_step"]
    if busiest["counted_step_ms"] is not None and share is not None and step is not None:
        # What the counted step's calls and bytes cost at the probed gloo rates: the communication of an ordinary
        # (uncounted) step, which the counter's own hook and waits do not slow.
        probed = sum(step["calls"].get(kind, 0) * probe[fit]["latency_us"] * 1e-3
                     + step["payload_bytes"].get(kind, 0) / (probe[fit]["gb_s"] * 1e6)
                     for kind, fit in (("all_reduce", "all_reduce"), ("p2p", "p2p")))
        plain = busiest["step_ms"] or busiest["counted_step_ms"]
        out["probed_comm_share"] = round(probed / plain, 4)
        out["worker_step_ms"] = {
            "step": busiest["step_ms"], "counted_step": busiest["counted_step_ms"],
            "collectives_in_counted_step": round(share * busiest["counted_step_ms"], 3),
            "comm_at_probed_rates": round(probed, 3), "rest": round(plain - probed, 3),
            "predicted_comm": round(st["comm"] + st["hop"], 3),
            "predicted_rest": round(max(st["compute"], st["memory"]) + st["overhead"], 3)}
    if step is not None:
        layers = cfg.n_layer // pp
        act = step["tokens"] * cfg.d_model * ACT_BYTES
        if tp > 1:
            out["all_reduce_per_step"] = {"calls": step["calls"].get("all_reduce", 0), "planned_calls": 2 * layers,
                                          "payload_bytes": step["payload_bytes"].get("all_reduce", 0),
                                          "planned_payload_bytes": 2 * layers * act, "tokens": step["tokens"]}
        if pp > 1:
            out["hop_per_step"] = {"p2p_payload_bytes": step["payload_bytes"].get("p2p", 0),
                                   "planned_payload_bytes": act, "tokens": step["tokens"],
                                   "note": "each stage counts its own side of the hop; its time is not measured"}
    rows = max((w["counted_step"]["logit_rows"] for w in workers if w["counted_step"]), default=0)
    out["reply_bytes"] = rows * cfg.vocab_size * 4  # the fp32 logits the last stage sends the driver per step
    out["workers"] = workers
    return out


# ---- what limits each figure ----------------------------------------------------------------------------------
def dominant(pred: dict) -> str:
    st = pred["slowest_stage_ms"]
    terms = {"reading the weights (memory)": st["memory"], "the matmuls (compute)": st["compute"],
             "per-layer dispatch overhead": st["overhead"], "communication": st["comm"] + st["hop"]}
    name = max(terms, key=terms.get)
    parts = ", ".join(f"{k} {st[k]:.2f}" for k in ("memory", "compute", "overhead", "comm", "hop") if st[k])
    return f"the planner's slowest stage ({parts} ms per step) is bound by {name}"


def limits(name: str, row: dict, pred: dict, cfg, probe: dict, n: int, base: dict | None) -> str:
    top = dominant(pred)
    if name == BASE:
        what = ("one sequence in one process: every step reads the non-expert weights and 2 of "
                f"{cfg.n_expert} experts per layer for one token, nothing to overlap" if n == 1 else
                f"{n} sequences share each weight read (the experts the batch touches, up to all {cfg.n_expert}), "
                "so the step grows far less than the tokens")
        prof = row["profile"]
        ops = ", ".join(f"{k} {v:.0%} ({prof['top_ops_ms_per_step'][k]:.1f} ms)"
                        for k, v in prof["top_ops_self_share"].items())
        bmm = prof["top_ops_self_share"].get("aten::bmm", 0.0)
        why = (": the grouped experts' batched matmuls (a few rows per expert) read the expert weights far slower "
               "than the GEMV bandwidth the planner's memory term assumes" if bmm >= 0.25 else "")
        return (f"{what}; measured step {row['step_ms_median']:.1f} ms against the planner's "
                f"{pred['token_ms']:.1f} ms ({row['measured_over_predicted']['tok_s']:.2f}x its speed); the "
                f"profiled step's top operators (self time): {ops}{why}; {top}.")
    comm = row["comm"]
    idle, idle_ms, reply = comm["worker_idle_share"], comm["idle_ms_per_step"] or 0.0, comm["reply_bytes"]
    if idle_ms >= 20 and reply >= 16384 - 512:  # + pickle's framing
        driver = (f"; above all, every step waits ~{idle_ms:.0f} ms with no worker computing ({idle:.0%} of the "
                  f"wall time): the last stage's reply ({reply / 1024:.0f} KB of logits, with pickle's framing) is "
                  "over the 16 KB up to which multiprocessing's send_bytes writes header and body at once, so it goes "
                  "out in two writes and Nagle's algorithm holds the second until the driver's delayed ACK (40 ms on "
                  "Linux): a transport "
                  "stall, not the model")
    else:
        driver = (f"; the workers wait {idle:.0%} of the wall time ({idle_ms:.1f} ms per step) for the driver: "
                  "scheduling, sampling, pickling the step out and the logits back (not in the planner), with 3 "
                  "processes on 2 cores")
    split = comm.get("worker_step_ms")
    if name == "tp2":
        calls = comm.get("all_reduce_per_step", {}).get("calls")
        what = (f"gloo all-reduce latency ({probe['all_reduce']['latency_us']:.0f} us probed) x {calls} calls per step "
                f"(2 per layer x {cfg.n_layer} layers) against matmuls halved per worker"
                + (", which at batch 1 are tiny" if n == 1 else
                   f"; {n} tokens make the all-reduces hardly dearer (latency, not bytes) while the matmuls grow"))
        if split:
            what += (f"; a worker's step: {split['step']:.1f} ms, of which the step's calls and bytes at the probed "
                     f"rates take {split['comm_at_probed_rates']:.1f} ms (planned {split['predicted_comm']:.1f}) "
                     f"and the rest {split['rest']:.1f} ms (planned {split['predicted_rest']:.1f}), "
                     f"{split['rest'] / base['step_ms_median']:.2f}x one process's whole step on 2 threads with all "
                     f"the matrices ({base['step_ms_median']:.1f} ms; its profile says where that goes); the rest "
                     "also holds the DTensor layers' dispatch and waiting for the slower rank; the counted steps take "
                     f"{split['counted_step']:.1f} ms (the counter's hook and its wait on every collective), so "
                     f"collective_share ({comm['collective_share_max']:.0%}) overstates")
        return f"{what}{driver}; {top}."
    stages = [w["step_ms"] for w in comm["workers"]]
    what = ("a single sequence cannot be pipelined: its next token needs the last stage's output, so the two stages "
            "take turns and each core idles half the time; a token costs both stages plus the hop" if n == 1 else
            f"two micro-batches of {pred['batch']} in flight, one per stage: both stages busy as long as they take "
            "equally long, and the driver samples one while the other runs; each stage reads half the weights")
    what += (f"; stage steps {' / '.join(f'{x:.1f}' for x in stages if x is not None)} ms (stage 1's includes its "
             f"wait; planned {pred['slowest_stage_ms']['step']:.2f} ms a stage): stage 0, half the layers on one "
             f"thread for {pred['batch']} sequence{'s' if pred['batch'] > 1 else ''}, takes "
             f"{stages[0] / base['step_ms_median']:.2f}x one process's step of all {cfg.n_layer} layers for "
             f"{n} on 2 threads ({base['step_ms_median']:.1f} ms)")
    return f"{what}{driver}; {top}."


# ---- the parent -----------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=None, help="model preset (default gpt4-mini; tiny with --quick)")
    ap.add_argument("--tokens", type=int, default=None, help="generated tokens per request (default 64; 16 --quick)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=16, help="requests of the concurrent workload")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3; 1 with --quick)")
    ap.add_argument("--layouts", default="tp2,pp2", help=f"of {', '.join(LAYOUTS)}")
    ap.add_argument("--hardware", choices=("measure", "local"), default="measure",
                    help="the planner's entry: measured in this run (default) or the cached `moekit bench hardware`")
    ap.add_argument("--quick", action="store_true", help="tiny, 16 tokens, one round: a smoke test")
    ap.add_argument("--json-out", help="also write the JSON here")
    ap.add_argument("--probe-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--probe-init", help=argparse.SUPPRESS)
    ap.add_argument("--probe-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe_rank is not None:
        probe_rank(args)
        return 0
    args.preset = args.preset or ("tiny" if args.quick else "gpt4-mini")
    args.tokens = args.tokens or (16 if args.quick else 64)
    args.repeats = args.repeats or (1 if args.quick else 3)
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    if unknown := [x for x in layouts if x not in LAYOUTS]:
        raise SystemExit(f"--layouts: unknown {unknown}; choose from {', '.join(LAYOUTS)}")
    if args.tokens < 2:
        raise SystemExit("--tokens must be >= 2 (decode speed is measured after the first token)")

    from moekit.counts import count_params
    from moekit.infer.engine import Engine
    from moekit.infer.executor import WorkerGroup
    from moekit.infer.worker import WorkerSpec
    from moekit.model.transformer import Transformer
    from moekit.presets import get_preset

    t_start = time.perf_counter()
    log = lambda s: print(f"[{time.perf_counter() - t_start:6.1f} s] {s}", file=sys.stderr)
    torch.set_num_threads(2)
    cfg = get_preset(args.preset)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    model.eval()
    counts = count_params(cfg)
    context = args.prompt_len + args.tokens // 2
    workloads = {"batch1": 1, f"concurrent{args.concurrency}": args.concurrency}
    kv_gb = 0.05
    log(f"{args.preset}: {counts.total / 1e6:.1f}M parameters; gloo probe")
    probe = gloo_probe()
    entries, how = hardware(args, probe)
    log(f"hardware: {how['entry']}")

    groups: dict = {}
    load_s = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "run"
        save_run(folder, model)
        try:
            engines = {BASE: Engine(model, None, kv_cache_gb=kv_gb)}
            for name in layouts:
                tp, pp = LAYOUTS[name]
                t0 = time.perf_counter()
                groups[name] = WorkerGroup(WorkerSpec(str(folder), tp=tp, pp=pp, kv_cache_gb=kv_gb), threads=1,
                                           progress=lambda line: None)
                load_s[name] = round(time.perf_counter() - t0, 2)
                engines[name] = Engine(None, None, executor=groups[name], kv_cache_gb=kv_gb)
                log(f"{name}: {groups[name].describe}")

            def run(name, n, seed, tokens=args.tokens):
                torch.set_num_threads(2 if name == BASE else 1)  # the driver of the workers keeps to one thread
                return run_once(engines[name], prompts(cfg, n, args.prompt_len, seed), tokens, groups.get(name))

            for name in engines:  # warm-up at each shape
                for n in workloads.values():
                    run(name, n, seed=999, tokens=min(args.tokens, 8))
            runs: dict = {(w, name): [] for w in workloads for name in engines}
            for r in range(args.repeats):
                for w, n in workloads.items():
                    for name in engines:
                        runs[(w, name)].append(run(name, n, seed=100 * r + n))
                        log(f"round {r + 1}/{args.repeats} {w} {name}: "
                            f"{runs[(w, name)][-1]['decode_tok_s']:.1f} decode tok/s")
            torch.set_num_threads(2)
            profiles = {w: profile_decode(engines[BASE], prompts(cfg, n, args.prompt_len, seed=7), args.tokens)
                        for w, n in workloads.items()}
        finally:
            for g in groups.values():
                g.close()
    torch.set_num_threads(2)

    result = {"bench": "parallel_serve", "preset": args.preset,
              "preset_note": ("gpt4-mini (the default): every configuration, both workloads and 3 rounds fit in "
                              "about 3 minutes on 2 cores" if args.preset == "gpt4-mini" else
                              "tiny (--quick): a smoke test; its steps are all overhead" if args.quick else
                              f"--preset {args.preset}"),
              "params_total": counts.total, "params_active": counts.active, "n_layer": cfg.n_layer,
              "prompt_len": args.prompt_len, "tokens": args.tokens, "context_planned": context,
              "repeats": args.repeats, "dtype": "fp32", "backend": "gloo", "torch": torch.__version__,
              "cores": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
              "runs": {BASE: "1 process x 2 threads", **{k: f"2 workers (tp {LAYOUTS[k][0]} x pp {LAYOUTS[k][1]}) x "
                                                         "1 thread + the driver (1 thread)" for k in layouts}},
              "worker_load_seconds": load_s, "gloo_probe": probe, "hardware": how, "results": {}, "ratios": {}}
    for w, n in workloads.items():
        res = result["results"][w] = {}
        for name in engines:
            tp, pp = LAYOUTS.get(name, (1, 1))
            row = summarize(runs[(w, name)], n, args.tokens)
            pred = predict(cfg, entries[2 if name == BASE else 1], tp, pp, n, context, args.prompt_len)
            if name != BASE:
                row["comm"] = comm_summary(row, cfg, tp, pp, pred, probe)
            row["predicted"] = {k: (round(v, 3) if isinstance(v, float) else
                                    {a: round(b, 3) for a, b in v.items()} if isinstance(v, dict) else v)
                                for k, v in pred.items()}
            row["measured_over_predicted"] = {
                "tok_s": round(row["decode_tok_s"] / pred["tok_s"], 3),
                "tok_s_per_user": round(row["decode_tok_s_per_user"] / pred["tok_s_per_user"], 3)}
            row["on_h100"] = on_h100(cfg, tp, pp, n, context, args.prompt_len)
            if name == BASE:
                row["profile"] = profiles[w]
            row["limits"] = limits(name, row, pred, cfg, probe, n, res.get(BASE))
            res[name] = row
        base = res[BASE]["decode_tok_s"]
        result["ratios"][w] = {f"{k}_vs_{BASE}": round(res[k]["decode_tok_s"] / base, 3) for k in layouts}
    w1, wn = workloads
    result["ratios"][f"{wn}_vs_{w1}"] = {k: round(result["results"][wn][k]["decode_tok_s"] /
                                                  result["results"][w1][k]["decode_tok_s"], 3) for k in engines}
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        tmp_out = Path(args.json_out).with_suffix(".tmp")
        tmp_out.write_text(text + "\n")
        tmp_out.replace(args.json_out)  # write and rename: never a half-written file
    return 0


if __name__ == "__main__":
    sys.exit(main())
