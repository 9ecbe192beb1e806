"""Decode and training beside a CPU hog (issue 17): how much slower than on a quiet machine, at each thread policy.

    python bench/contention.py                      # ~4 min on 2 cores
    python bench/contention.py --preset tiny --tokens 64

A hog is one process spinning on a core (`while True: pass`), started after the model is loaded and warmed up, as a
job that begins while a server runs. Every figure is measured quiet and beside the hog in the same run, in this
order: quiet, hog, quiet again (the quiet figure is the better of the two, so that drift does not count as
contention). Decode: gpt4-mini batch-1 greedy decode through the engine, tokens/s after the first token, with
torch's threads fixed at the usable cores, fixed at 1, and governed (moekit/cpu.py ThreadGovernor, ticked after
every step as `moekit serve` does, 0.5 s period; reserve 0 as for one generating process). Training: the tiny
preset's step (bench/train_step.py in a subprocess, fp32) at the usable cores, `moekit train`'s default. Prints
JSON: tokens/s, and slowdown = quiet / hog (the issue asks < 2.5x).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import decode as dec  # noqa: E402  (bench/decode.py: the engine set-up and prompts)

from moekit import cpu  # noqa: E402
from moekit.infer import SamplingParams  # noqa: E402
from moekit.model.transformer import Transformer  # noqa: E402
from moekit.presets import get_preset  # noqa: E402


def start_hog() -> subprocess.Popen:
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.5)
    return hog


def decode_tok_s(engine, prompt: list[int], tokens: int, governor: cpu.ThreadGovernor | None) -> float:
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
    engine.step()  # the prefill and the first token
    t0, n = time.perf_counter(), 0
    while engine.has_unfinished():
        n += sum(len(o.new_token_ids) for o in engine.step())
        if governor is not None:
            governor.tick()
    return n / (time.perf_counter() - t0)


def decode_policy(engine, prompt, tokens: int, policy: str) -> dict:
    usable = cpu.usable_cores()
    torch.set_num_threads(1 if policy == "fixed-1" else usable)
    governor = cpu.ThreadGovernor(period_s=0.5, threads=usable) if policy == "governed" else None
    decode_tok_s(engine, prompt, 8, None)  # warm-up at this thread count
    quiet = decode_tok_s(engine, prompt, tokens, governor)
    hog = start_hog()
    try:
        busy = decode_tok_s(engine, prompt, tokens, governor)
        threads_with_hog = torch.get_num_threads()
    finally:
        hog.kill()
        hog.wait()
    time.sleep(1.0)
    quiet = max(quiet, decode_tok_s(engine, prompt, tokens, governor))
    return {"quiet_tok_s": round(quiet, 1), "hog_tok_s": round(busy, 1), "slowdown": round(quiet / busy, 2),
            "threads_with_hog": threads_with_hog}


def train_tok_s() -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["OMP_NUM_THREADS"] = str(cpu.usable_cores())  # moekit train's default on a machine it has alone
    out = subprocess.run([sys.executable, str(Path(__file__).parent / "train_step.py"), "--preset", "tiny",
                          "--dtypes", "fp32", "--no-plan", "--repeats", "3"], capture_output=True, text=True,
                         env=env, check=True).stdout
    return json.loads(out)["fp32"]["tok_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt4-mini")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--no-train", action="store_true")
    args = ap.parse_args()
    cfg = get_preset(args.preset)
    torch.manual_seed(0)
    engine = dec.make_engine(Transformer(cfg).eval())
    prompt = dec.prompts(cfg, 1, 64)[0]
    res: dict = {"preset": args.preset, "usable_cores": cpu.usable_cores(), "torch": torch.__version__,
                 "decode": {p: decode_policy(engine, prompt, args.tokens, p) for p in ("fixed-all", "fixed-1",
                                                                                         "governed")}}
    if not args.no_train:
        quiet = train_tok_s()
        hog = start_hog()
        try:
            busy = train_tok_s()
        finally:
            hog.kill()
            hog.wait()
        quiet = max(quiet, train_tok_s())
        res["train_tiny"] = {"quiet_tok_s": round(quiet), "hog_tok_s": round(busy), "slowdown": round(quiet / busy, 2)}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
