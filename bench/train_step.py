"""Tokens/s and MFU of a full training step (forward, backward, clip, AdamW) in bf16 autocast and fp32.

    python bench/train_step.py [--preset gpt4-mini] [--batch-tokens 4096] [--seq-len 1024] [--repeats 3]
                               [--profile 15]

MFU (SPEC section 6) = training FLOPs per second / peak, with training FLOPs = 3 x forward FLOPs
of the *active* parameters plus attention (`moekit.train.metrics.train_flops_per_token`). The
peak of each dtype is the best n x n x n GEMM measured in this same run (`measure_gemm_peak`), so
the MFU says how close the whole step gets to this machine's matrix-multiply speed. One model and
one optimizer serve both dtypes; steps alternate bf16, fp32, bf16, ... so that a change in the
machine's load hits both alike. The optimizer's share of the step is reported apart (AdamW touches
all parameters, the forward only the active ones). Then the planner's prediction of each step from this machine's
entry, measured by `moekit bench hardware` in the same run (`--no-plan` skips it), with measured / predicted.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch

from moekit.counts import count_params
from moekit.model.transformer import Transformer
from moekit.presets import get_preset
from moekit.train.config import TrainConfig
from moekit.train.data import Mixture, PackedSource
from moekit.train.loop import Trainer
from moekit.train.metrics import measure_gemm_peak, train_flops_per_token
from moekit.util import cpu_has_bf16

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt4-mini")
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=0, help="0 = the preset's max_seq_len")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per dtype (after one warm-up each)")
    ap.add_argument("--gemm-n", type=int, default=2048)
    ap.add_argument("--compile", action="store_true", help="torch.compile each block (TrainConfig.compile)")
    ap.add_argument("--dtypes", default="bf16,fp32", help="which of bf16, fp32 to time (default both)")
    ap.add_argument("--no-plan", action="store_true", help="skip the planner's prediction")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also profile one step of the first --dtypes entry and report its N most expensive operators")
    args = ap.parse_args()

    cfg = get_preset(args.preset)
    seq_len = args.seq_len or cfg.max_seq_len
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Random tokens stand in for data: speed does not depend on which tokens they are.
    rng = np.random.default_rng(0)
    src = PackedSource("random", 1.0, rng.integers(0, cfg.vocab_size, 4_000_000, dtype=np.uint16), seq_len)
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    tc = TrainConfig(steps=1000, batch_tokens=args.batch_tokens, batch_tokens_start=0, grad_accum=args.grad_accum,
                     warmup_steps=10, compile=args.compile)
    trainer = Trainer(model, tc, seq_len, Mixture([src], 0), {}, torch.ones(cfg.vocab_size), tempfile.mkdtemp(),
                      device, None)
    opt_step, opt_times = trainer.opt.step, []

    def timed_opt_step():
        t0 = time.perf_counter()
        opt_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        opt_times.append(time.perf_counter() - t0)

    trainer.opt.step = timed_opt_step

    dtypes = {name: DTYPES[name] for name in args.dtypes.split(",")}
    peaks = {name: [] for name in dtypes}
    times = {name: [] for name in dtypes}
    opt_share = {name: [] for name in dtypes}
    tokens = {}
    for i in range(args.repeats + 1):
        for name, dtype in dtypes.items():
            peaks[name].append(measure_gemm_peak(dtype, device, n=args.gemm_n, min_seconds=0.5))
            trainer.dtype = dtype if dtype != torch.float32 else None
            t0 = time.perf_counter()
            rec = trainer.train_step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i > 0:  # the first step of each dtype is a warm-up
                times[name].append(time.perf_counter() - t0)
                opt_share[name].append(opt_times[-1])
            tokens[name] = rec["batch_tokens"]

    fpt = train_flops_per_token(cfg, seq_len)
    c = count_params(cfg)
    result = {
        "bench": "train_step", "preset": cfg.name, "device": str(device), "threads": torch.get_num_threads(),
        "cpu_bf16_units": cpu_has_bf16() if device.type == "cpu" else None, "machine": platform.machine(),
        "load_avg_1min": os.getloadavg()[0],
        "params_total": c.total, "params_active": c.active, "seq_len": seq_len, "compile": args.compile,
        "flops_per_token_train": fpt,
    }
    for name in dtypes:
        step_s = statistics.median(times[name])
        tok_s = tokens[name] / step_s
        peak = max(peaks[name])
        result[name] = {
            "batch_tokens": tokens[name], "step_s": step_s, "tok_s": tok_s,
            "achieved_gflops": tok_s * fpt / 1e9, "gemm_peak_gflops": peak / 1e9,
            "mfu": tok_s * fpt / peak, "optimizer_s": statistics.median(opt_share[name]),
            "mfu_without_optimizer": tokens[name] * fpt / (step_s - statistics.median(opt_share[name])) / peak,
        }
    if "fp32" in dtypes and "bf16" in dtypes:
        result["bf16_speedup_over_fp32"] = result["fp32"]["step_s"] / result["bf16"]["step_s"]
    if "bf16" in dtypes:
        result["bf16_mfu_vs_bf16_peak"] = result["bf16"]["mfu"]
    result["target_mfu"] = 0.35
    if not args.no_plan:
        result["planner"] = planner(cfg, device, result, dtypes, seq_len, tc, args.batch_tokens // args.grad_accum)
    if args.profile:
        first = next(iter(dtypes))
        result[f"{first}_profile"] = profile_step(trainer, device, args.profile, dtypes[first])
    print(json.dumps(result, indent=2))


def planner(cfg, device: torch.device, result: dict, dtypes: dict, seq_len: int, tc: TrainConfig,
            micro_tokens: int) -> dict:
    """The planner's step time for each dtype timed above (moekit.plan.train, MFU an output), from this machine's
    entry as `moekit bench hardware` measures it in this same run: GEMMs at this model's training shapes, attention,
    an eager elementwise op's bandwidth (moekit/train_profile.py); measured / predicted beside it."""
    from moekit.bench_hardware import measure
    from moekit.plan.train import train

    entry = measure(str(device), model=cfg.name, train_tokens=micro_tokens)
    out = {"hardware": {"tflops": entry.tflops, "elementwise_gb_s": entry.elementwise_gb_s,
                        "attention_tflops": entry.attention_tflops, "hbm_gb_s": entry.hbm_gb_s}}
    for name in dtypes:
        if name not in entry.gemm_tflops_at:
            out[name] = {"skipped": f"the entry has no {name} training figures (a CPU without bf16 units)"}
            continue
        batch = result[name]["batch_tokens"]
        p = train(cfg, entry, n_gpus=1, tokens=batch, tp=1, pp=1, zero_stage=0, batch_tokens=batch, seq_len=seq_len,
                  micro_batch=max(1, micro_tokens // seq_len), recompute=tc.recompute, dtype=name,
                  optimizer_precision="fp32")
        measured = result[name]["step_s"]
        out[name] = {"predicted_step_s": round(p.step.seconds, 3), "measured_step_s": round(measured, 3),
                     "measured_over_predicted": round(measured / p.step.seconds, 3),
                     "predicted_mfu": round(p.mfu, 4),
                     "parts_s": {k: round(v, 3) for k, v in p.step.parts.items() if v}}
    return out


def profile_step(trainer: Trainer, device: torch.device, top: int, dtype: torch.dtype) -> list[dict]:
    """One step under torch.profiler: the `top` operators by self time on the device (the CPU
    on a CPU), each with its share of the step, so that the next optimisation has a target."""
    from torch.profiler import ProfilerActivity, profile

    trainer.dtype = dtype if dtype != torch.float32 else None
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in events)
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [{"op": e.key[:90], "calls": e.count, "ms": round(getattr(e, attr) / 1e3, 2),
             "share": round(getattr(e, attr) / total, 3)} for e in events[:top]]


if __name__ == "__main__":
    main()
