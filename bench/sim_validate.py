"""The simulator against the real server on this machine: calibrate on the server, then serve and simulate the same
arrivals, and compare `moekit bench serve`'s figures.

    OMP_NUM_THREADS=1 python bench/sim_validate.py --model runs/tiny
    OMP_NUM_THREADS=1 python bench/sim_validate.py --model runs/mini --num-prompts 60 --prompt-len 64 --output-len 32

1. Calibrate on the server itself, just before each workload: `moekit serve --step-log` under a calibration load
   (`moekit bench serve`, mixed lengths, seeds of its own), then `moekit sim calibrate --from-step-log SEGMENT
   --client-detail D` on that segment of the log: the step time, the serving loop's gap between steps and the time
   a request spends outside the engine (HTTP, tokenizing, streaming), as the serving process measured them minutes
   before (a shared machine's speed drifts by tens of percent over a quarter of an hour: one profile for all the
   workloads would compare the simulator with a different machine).
2. The saturation rate: the simulator's request throughput with every request at once (the profile's capacity).
3. The workload, on the same server, with its own seed (never a calibration's): Poisson at
   `--loads` x saturation (light, near saturation, overloaded) with fixed lengths; mixed lengths (log-normal);
   a shared system prompt (the prefix cache); a time-scaled slice of the Azure conversation trace (lengths clipped
   to the model's context). Each is sent by `moekit bench serve --save-detailed`, and the simulator replays that
   detail file (the very send times and lengths; the shared prefix as one prefix) with the profile and the
   server's KV pool and scheduler limits.
Prints JSON: per workload, TTFT and TPOT p50/p90 and output throughput of server and simulator and their ratio, and
the worst relative error, twice: with the profile calibrated just before ("before": out of sample) and with one
fitted on the workload's own segment of the log ("own": the step costs of those very minutes, in sample for the
step model, so that what is compared is the simulator's scheduling and queueing, not the machine's drift).
Kept comparable on a shared machine: one server, at one thread, the client on the other core, nothing else
running (check `uptime` before), each workload right after its own calibration.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

KEYS = ("median_ttft_ms", "p90_ttft_ms", "median_tpot_ms", "p90_tpot_ms", "output_throughput")
MOEKIT = [sys.executable, "-m", "moekit"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`moekit serve` in a subprocess, up until the block ends."""

    def __init__(self, model: str, engine_args: list[str], work: Path, name: str, env: dict):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = work / f"{name}.steps.jsonl"
        self.cmd = MOEKIT + ["serve", "--model", model, "--port", str(self.port), "--step-log", str(self.log),
                             *engine_args]
        self.stderr, self.env = work / f"{name}.server.log", env

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=open(self.stderr, "w"))
        t = time.time()
        while time.time() - t < 300:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}: see {self.stderr}")
            try:
                urllib.request.urlopen(self.url + "/v1/models", timeout=2)
                return self
            except OSError:
                time.sleep(0.5)
        raise SystemExit("the server did not come up")

    def lines(self) -> int:
        """Lines of the step log on disk, once the engine has gone idle and flushed it."""
        time.sleep(0.5)  # the engine flushes its log when it finds itself idle (AsyncEngine._loop_steps)
        return len(self.log.read_text().splitlines())

    def lines_between(self, a: int, b: int) -> list[str]:
        return [line + "\n" for line in self.log.read_text().splitlines()[a:b]]

    def header(self) -> str:
        return self.log.read_text().splitlines()[0] + "\n"

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def bench(server: Server, model: str, detail: Path, env: dict, *flags: str) -> dict:
    out = detail.with_suffix(".json")
    subprocess.run(MOEKIT + ["bench", "serve", "--url", server.url, "--ignore-eos", "--tokenizer", model,
                             "--no-progress", "--save-detailed", str(detail), "--out", str(out), *flags],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def simulate(profile: str, detail: Path | None = None, *, requests=None, prefix_len: int = 0) -> dict:
    from moekit.sim.profile import StepProfile
    from moekit.sim.simulator import Deployment
    from moekit.sim.simulator import simulate as run_sim
    from moekit.sim.steptime import ProfileModel
    from moekit.sim.workload import SimRequest, load_trace

    prof = StepProfile.load(profile)
    if requests is None:
        requests = [SimRequest(r.arrival, r.prompt_len, r.output_len, 0 if prefix_len else -1, prefix_len)
                    for r in load_trace(detail)]
    dep = Deployment.of_engine(prof.engine)
    model = ProfileModel(prof)
    return run_sim(requests, lambda i: model, dep).summary()


def saturation(profile: str, n: int, prompt_len: int, output_len: int) -> float:
    """Requests/s the profile serves when all `n` arrive at once."""
    from moekit.sim.workload import SimRequest

    s = simulate(profile, requests=[SimRequest(0.0, prompt_len, output_len) for _ in range(n)])
    return s["request_throughput"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a moekit run (with its tokenizer)")
    p.add_argument("--num-prompts", type=int, default=200, help="requests per validation workload (default 200)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--loads", default="0.25,0.85,1.5", help="Poisson rates as multiples of saturation")
    p.add_argument("--calibration-prompts", type=int, default=300, help="requests of each calibration run")
    p.add_argument("--calibration-concurrency", type=int, default=64, help="default 64 (= --max-num-seqs)")
    p.add_argument("--engine-args", default="--max-num-seqs 64 --max-num-batched-tokens 512")
    p.add_argument("--workloads", default="poisson,mixed,prefix,azure")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    work = Path(tempfile.mkdtemp(prefix="simval-"))
    engine_args = args.engine_args.split()
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    ctx = int(cfg.get("max_seq_len", 2048))
    P, Q, N = args.prompt_len, args.output_len, args.num_prompts
    t_start = time.time()

    lens = ["--prompt-len", f"uniform:8:{min(2 * P, ctx // 2)}", "--output-len", f"uniform:4:{2 * Q}"]

    def calibrate(srv: Server, i: int) -> tuple[str, float]:
        """1. A calibration segment on this server, mixed lengths, seeds of its own: a closed loop up to the engine's
        running limit (batches from 1 to max_num_seqs as the load ramps up and drains), then Poisson arrivals at half
        its throughput, whose requests give the latency outside the engine at a load a client sees (a flooded
        client's own event loop inflates its TTFTs). The profile is fitted on this segment of the server's log only.
        (profile, saturation for the workload's nominal lengths.)"""
        a = srv.lines()
        closed = bench(srv, args.model, work / f"c{i}-closed.jsonl", env, "--num-prompts",
                       str(args.calibration_prompts), "--request-rate", "inf", "--max-concurrency",
                       str(args.calibration_concurrency), *lens, "--seed", str(1000 + i))
        cal = work / f"c{i}.jsonl"
        bench(srv, args.model, cal, env, "--num-prompts", str(args.calibration_prompts), "--request-rate",
              f"{closed['request_throughput'] / 2:.4f}", *lens, "--seed", str(2000 + i))
        segment = work / f"c{i}.steps.jsonl"
        segment.write_text(srv.header() + "".join(srv.lines_between(a, srv.lines())))
        profile = str(work / f"profile{i}.json")
        subprocess.run(MOEKIT + ["sim", "calibrate", "--from-step-log", str(segment), "--client-detail", str(cal),
                                 "--out", profile], check=True, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        return profile, saturation(profile, N, P, Q)

    # 3. the workloads: (name, bench flags given the saturation, shared prefix tokens, lengths for the saturation)
    plans = []
    wl = args.workloads.split(",")
    if "poisson" in wl:
        for k, load in enumerate(float(x) for x in args.loads.split(",")):
            plans.append((f"poisson x{load:g}", lambda sat, k=k, load=load: [
                "--num-prompts", str(N), "--request-rate", f"{load * sat:.4f}", "--prompt-len", str(P),
                "--output-len", str(Q), "--seed", str(k)], 0))
    if "mixed" in wl:
        plans.append(("mixed lengths x0.7", lambda sat: [
            "--num-prompts", str(N), "--request-rate", f"{0.7 * sat:.4f}", "--prompt-len", f"lognormal:{P}:0.8",
            "--output-len", f"lognormal:{Q}:0.8", "--seed", "11"], 0))
    if "prefix" in wl:
        k = P * 3 // 4
        plans.append((f"shared prefix {k} x0.8", lambda sat: [
            "--num-prompts", str(N), "--request-rate", f"{0.8 * sat:.4f}", "--prompt-len", str(P), "--output-len",
            str(Q), "--shared-prefix-len", str(k), "--seed", "12"], k))
    if "azure" in wl:
        from moekit.sim.workload import builtin_trace, load_trace

        # The trace's first requests, time-scaled to ~0.7 x the saturation (at the trace's own clipped lengths).
        head = load_trace(builtin_trace("conv"), max_len=ctx - 8, max_requests=N)
        span = max(head[-1].arrival, 1e-9)
        shape = (sum(r.prompt_len for r in head) / len(head), sum(r.output_len for r in head) / len(head))

        def azure(sat: float) -> list[str]:
            return ["--trace", "conv", "--trace-duration", f"{span + 1e-3:.3f}", "--time-scale",
                    f"{0.7 * sat * span / len(head):.4f}", "--max-model-len", str(ctx)]

        plans.append(("azure conv x0.7", azure, 0, shape))
    rows = []
    with Server(args.model, engine_args, work, "server", env) as srv:
        for i, (name, flags, prefix, *shape) in enumerate(plans):
            profile, sat = calibrate(srv, i)
            if shape:
                sat = saturation(profile, N, int(shape[0][0]), max(1, int(shape[0][1])))
            detail = work / f"v{i}.jsonl"
            a = srv.lines()
            real = bench(srv, args.model, detail, env, *flags(sat))
            # The same run's own segment of the log: the step costs of the very minutes the workload ran (in
            # sample for the step model, so it isolates what the simulator adds: scheduling and queueing).
            own = work / f"v{i}.steps.jsonl"
            own.write_text(srv.header() + "".join(srv.lines_between(a, srv.lines())))
            own_profile = str(work / f"own{i}.json")
            subprocess.run(MOEKIT + ["sim", "calibrate", "--from-step-log", str(own), "--client-detail",
                                     str(detail), "--out", own_profile], check=True, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            row = {"workload": name, "saturation_req_s": sat}
            for key, prof_path in (("before", profile), ("own", own_profile)):
                sim = simulate(prof_path, detail, prefix_len=prefix)
                prof = json.loads(Path(prof_path).read_text())
                row[key] = {"latency_ms": prof["latency_s"] * 1e3, "step_fit_median_err": prof["fit"]["median_rel_err"],
                            **{k: {"server": real[k], "sim": sim[k], "ratio": sim[k] / real[k] if real[k] else None}
                               for k in KEYS}}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)

    def worst(key: str) -> float:
        return max(abs(r[key][k]["ratio"] - 1) for r in rows for k in KEYS if r[key][k]["ratio"] is not None)

    result = {"model": args.model, "work": str(work), "engine_args": args.engine_args, "prompt_len": P,
              "output_len": Q, "num_prompts": N, "rows": rows,
              "worst_relative_error": {"calibrated_before": worst("before"), "fitted_on_the_run": worst("own")},
              "wall_s": time.time() - t_start}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
