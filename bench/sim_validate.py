"""The simulator against the real server on this machine: calibrate, serve, load, simulate, compare.

    python bench/sim_validate.py --model runs/tiny --rates 2,8,30 --num-prompts 120

1. `moekit sim calibrate --model RUN` measures the engine in-process (a step-time profile).
2. `moekit serve --model RUN` with the same engine flags; `moekit bench serve` sends Poisson arrivals of each rate
   (seed 0, `--tokenizer` so prompts are exactly --prompt-len tokens, `--ignore-eos` so outputs are --output-len).
3. The simulator runs the very same arrival times (bench serve's gaps from random.Random(seed), rebuilt here) and
   lengths with the profile, with the server's KV pool and scheduler limits.
Prints JSON: for each rate, TTFT and TPOT p50/p90 and output throughput of server and simulator and their ratios.
The machine is shared: the server, the client and this script run on the same cores, one rate at a time.
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc, timeout: float = 120) -> None:
    t = time.time()
    while time.time() - t < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the server did not come up")


def simulate(profile_path: str, rate: float, n: int, prompt_len: int, output_len: int, seed: int) -> dict:
    from moekit.sim.profile import StepProfile
    from moekit.sim.simulator import Deployment
    from moekit.sim.simulator import simulate as run_sim
    from moekit.sim.steptime import ProfileModel
    from moekit.sim.workload import SimRequest, arrivals

    prof = StepProfile.load(profile_path)
    a = arrivals(rate, n=n, seed=seed)
    times = [0.0] + a[:-1]  # bench serve sends request 0 at once, then waits gap k after request k
    reqs = [SimRequest(t, prompt_len, output_len) for t in times]
    e = prof.engine
    dep = Deployment(num_blocks=e["num_blocks"], block_size=e["block_size"], max_num_seqs=e["max_num_seqs"],
                     max_num_batched_tokens=e["max_num_batched_tokens"], max_model_len=e["max_model_len"],
                     enable_prefix_caching=e["enable_prefix_caching"])
    model = ProfileModel(prof)
    return run_sim(reqs, lambda i: model, dep, seed=seed).summary()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--rates", default="2,8,30")
    p.add_argument("--num-prompts", type=int, default=120)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--profile", help="use this profile instead of calibrating")
    p.add_argument("--engine-args", default="--max-num-seqs 64 --max-num-batched-tokens 512")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    moekit = [sys.executable, "-m", "moekit"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    work = Path(tempfile.mkdtemp(prefix="simval-"))
    prof = args.profile or str(work / "profile.json")
    if not args.profile:
        subprocess.run(moekit + ["sim", "calibrate", "--model", args.model, "--out", prof,
                                 *args.engine_args.split()], check=True, env=env)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(moekit + ["serve", "--model", args.model, "--port", str(port),
                                        *args.engine_args.split()], env=env, stdout=subprocess.DEVNULL,
                              stderr=open(work / "server.log", "w"))
    rows = []
    try:
        wait_up(url, server)
        for rate in [float(r) for r in args.rates.split(",")]:
            out = work / f"bench-{rate}.json"
            subprocess.run(moekit + ["bench", "serve", "--url", url, "--num-prompts", str(args.num_prompts),
                                     "--request-rate", str(rate), "--prompt-len", str(args.prompt_len),
                                     "--output-len", str(args.output_len), "--ignore-eos", "--tokenizer",
                                     args.model, "--seed", str(args.seed), "--no-progress", "--out", str(out)],
                           check=True, env=env, stdout=subprocess.DEVNULL)
            real = json.loads(out.read_text())
            sim = simulate(prof, rate, args.num_prompts, args.prompt_len, args.output_len, args.seed)
            rows.append({"rate": rate, **{k: {"server": real[k], "sim": sim[k], "ratio": sim[k] / real[k]
                                              if real[k] else None} for k in KEYS}})
    finally:
        server.terminate()
        server.wait(30)
    worst = max(abs(r[k]["ratio"] - 1) for r in rows for k in KEYS if r[k]["ratio"] is not None)
    print(json.dumps({"model": args.model, "profile": prof, "prompt_len": args.prompt_len,
                      "output_len": args.output_len, "num_prompts": args.num_prompts, "rows": rows,
                      "worst_relative_error": worst}, indent=1))


if __name__ == "__main__":
    main()
