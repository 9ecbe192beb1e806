"""`moekit bench hardware`: measure this machine and write its entry in the hardware table's format.

    moekit bench hardware                       # CUDA if available, else CPU; about a minute
    moekit bench hardware --device cpu --out my_cpu.json --model gpt4-mini
    moekit plan serve --model gpt4-mini --gpu local --tp 1 --pp 1 --batch 16 --weight-dtype int8

Hardware figures, each the best of repeated timed runs (as STREAM reports its best rate), with the accelerator
synchronized around every timing:
- streaming memory read bandwidth: sum a buffer larger than the last-level cache (256 MB on CPU, 2 GB on GPU);
  the planner reads the KV cache at it;
- GEMM FLOP/s per dtype: 2 n^3 / time of an n x n nn.Linear product (fp32 with PyTorch's default precision);
and what moekit's own engine reaches on it, per weight format (fp32, bf16, int8), with `--model`'s shapes
(moekit/engine_profile.py): the bandwidth at which its batch-1 decode pass reads weights (`gemv_gb_s`: decode's
matrix-vector products as the engine runs them, through its own modules and MoE dispatch; `batched_gemv_gb_s` the
same with 16 tokens a step), and its overheads per
layer, per expert a MoE layer runs, per decode step and per sequence (`overhead_by_dtype`; the scalar fields hold
the device's default format's: fp32 on a CPU, bf16 on a GPU). The planner adds those to the bandwidth and compute
times, so that `--gpu local` predicts moekit's decode speed on this machine (bench/decode.py prints measured /
predicted). For training (moekit/train_profile.py): the TFLOP/s of every GEMM the planner counts in `--model`'s step
at `--train-tokens` (forward and both backward products), causal attention forward and backward, and an eager
elementwise op's bandwidth, so that `moekit plan train --gpu local` predicts its step (bench/train_step.py).
The entry (default `~/.cache/moekit/hardware.json`, where `--gpu local` finds it) holds achieved
figures, so its efficiencies are 1 and the planner uses them as they are. Written atomically.

It lives beside `moekit.plan`, not in it: timing moekit's engine imports `moekit.infer`, and the planner
is pure functions over a hardware table (it imports no engine, DESIGN.md "Layout").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

from moekit.plan.hardware import GPU, local_hardware_path
from moekit.util import atomic_write_text

GEMM_DTYPES = ("fp32", "bf16")
# (streaming buffer bytes, largest GEMM n) per device kind and size.
SIZES = {("cpu", False): (256e6, 2048), ("cuda", False): (2e9, 8192), ("cpu", True): (4e6, 128),
         ("cuda", True): (16e6, 256)}


def _best_time(fn: Callable[[], object], sync: Callable[[], None], min_time: float,
               max_iters: int = 50) -> float:
    """Best seconds per call of `fn` after one warm-up call, over at least `min_time` seconds of runs."""
    fn()
    sync()
    best, spent, n = math.inf, 0.0, 0
    while n < 3 or (spent < min_time and n < max_iters):
        t0 = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - t0
        best, spent, n = min(best, dt), spent + dt, n + 1
    return best


def measure(device: str | None = None, quick: bool = False, label: str | None = None, model: str | None = None,
            train_tokens: int = 4096, log: Callable[[str], None] = lambda s: None) -> GPU:
    """Measure `device` ("cpu", "cuda", "cuda:1"; default CUDA if available) and return its hardware entry, the
    engine's figures with `model`'s shapes (a preset; default gpt4-mini, tiny when `quick`) and its training step's
    at `train_tokens` tokens per micro-batch in sequences of the model's context."""
    import torch
    import torch.nn.functional as F

    from moekit import engine_profile, train_profile
    from moekit.presets import get_preset
    from moekit.util import cpu_has_bf16

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to PyTorch; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {device!r}")
    cfg = get_preset(model or ("tiny" if quick else "gpt4-mini"))
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    stream_bytes, gemm_max = SIZES[(dev.type, quick)]
    min_time = 0.05 if quick else 0.5
    dt_of = {"fp32": torch.float32, "bf16": torch.bfloat16}

    buf = torch.ones(int(stream_bytes // 4), dtype=torch.float32, device=dev)
    t = _best_time(buf.sum, sync, min_time)
    stream = buf.numel() * 4 / t / 1e9
    log(f"memory read      {stream:,.1f} GB/s  ({stream_bytes / 1e6:,.0f} MB buffer)")
    buf = None  # free it before the matmuls

    tflops = {}
    for name in GEMM_DTYPES:
        dtype = dt_of[name]
        n = 256 if not quick else 64
        while True:  # grow the matmul until one call is long enough to time well, or reaches the cap
            a, b = torch.randn(n, n, device=dev).to(dtype), torch.randn(n, n, device=dev).to(dtype)
            # F.linear: x W^T with W stored (out, in), as nn.Linear runs it (a bf16 a @ b took another, 7x slower
            # path on an AVX2 CPU without bf16 units)
            t = _best_time(lambda a=a, b=b: F.linear(a, b), sync, min_time / 4 if n < gemm_max else min_time)
            if n >= gemm_max or t > 0.1:
                break
            n *= 2
        tflops[name] = 2 * n**3 / t / 1e12
        log(f"GEMM {name:<5}      {tflops[name] * 1e3:,.1f} GFLOP/s  ({n} x {n})")
        a = b = None

    gemv, batched, overheads = {}, {}, {}
    batch = engine_profile.BATCHES[-1]
    for name in engine_profile.WEIGHT_DTYPES:
        gemv[name] = engine_profile.weight_read_gb_s(cfg, name, dev, repeats=4 if quick else 10, strict=not quick)
        batched[name] = {str(batch): round(engine_profile.weight_read_gb_s(cfg, name, dev, batch=batch,
                                                                           repeats=2 if quick else 6,
                                                                           strict=not quick), 3)}
        o = engine_profile.engine_overheads(cfg, name, dev, steps=4 if quick else 32)
        overheads[name] = {"layer": round(o.layer_us, 1), "step": round(o.step_us, 1),
                           "expert": round(o.expert_us, 1), "seq": round(o.seq_us, 1)}
        log(f"decode {name:<5}    weights read at {gemv[name]:,.1f} GB/s, {batched[name][str(batch)]:,.1f} with "
            f"{batch} tokens ({cfg.name}); overhead {o.layer_us:,.0f} us "
            f"per layer, {o.expert_us:,.0f} per expert, {o.step_us:,.0f} per step, {o.seq_us:,.0f} per sequence")
    default = overheads["bf16" if dev.type == "cuda" else "fp32"]

    # The training step's parts at the model's shapes; bf16 where it has units (a CPU without them runs bf16
    # matmuls 5-10x slower than fp32, nobody trains so, and timing them would take minutes).
    tokens = 256 if quick else train_tokens
    seq = min(cfg.max_seq_len, tokens)
    gemms, attention = {}, {}
    for name in [n for n in GEMM_DTYPES if n == "fp32" or dev.type == "cuda" or cpu_has_bf16()]:
        gemms[name] = {k: round(v, 6) for k, v in train_profile.gemm_rates(cfg, tokens, name, dev,
                                                                             repeats=1 if quick else 3).items()}
        attention[name] = {k: round(v, 6) for k, v in train_profile.attention_rates(
            cfg, seq, name, dev, batch=max(1, tokens // seq), repeats=1 if quick else 2).items()}
        log(f"train {name:<5}     GEMMs at {cfg.name}'s shapes {min(gemms[name].values()) * 1e3:,.1f}-"
            f"{max(gemms[name].values()) * 1e3:,.1f} GFLOP/s; attention {attention[name]['fwd'] * 1e3:,.1f} forward, "
            f"{attention[name]['bwd'] * 1e3:,.1f} backward")
    elementwise = train_profile.elementwise_gb_s(cfg, tokens, "fp32", dev)
    log(f"elementwise      {elementwise:,.1f} GB/s (x + y into a fresh tensor, {cfg.name}'s activations)")

    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        what, memory, per_node = props.name, props.total_memory, torch.cuda.device_count()
    else:
        what = platform.processor() or platform.machine()
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        what = f"{what}, {torch.get_num_threads()} threads"
        per_node = 1
    return GPU(name=label or f"local-{dev.type}", memory_gb=round(memory / 1e9, 3), hbm_gb_s=round(stream, 3),
               tflops={k: round(v, 6) for k, v in tflops.items()},
               gemv_gb_s={k: round(v, 3) for k, v in gemv.items()}, batched_gemv_gb_s=batched,
               gpus_per_node=per_node, bandwidth_efficiency=1.0, flops_efficiency=1.0,
               layer_overhead_us=default["layer"], step_overhead_us=default["step"],
               expert_overhead_us=default["expert"], seq_overhead_us=default["seq"], overhead_by_dtype=overheads,
               gemm_tflops_at=gemms, attention_tflops=attention, elementwise_gb_s=round(elementwise, 3),
               source=f"measured by `moekit bench hardware` on {time.strftime('%Y-%m-%d')}: {what}, "
                      f"torch {torch.__version__}, decode figures with {cfg.name}'s shapes, training figures at "
                      f"{tokens} tokens in sequences of {seq}"
                      f"{' (quick sizes)' if quick else ''}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    p.add_argument("--out", help=f"where to write the entry (default {local_hardware_path()})")
    p.add_argument("--label", help="the entry's name (default local-cpu / local-cuda)")
    p.add_argument("--model", help="the preset whose decode shapes the engine figures use (default gpt4-mini)")
    p.add_argument("--train-tokens", type=int, default=4096,
                   help="tokens per micro-batch of the training figures (default 4096, bench/train_step.py's)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the plumbing, not the machine")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else local_hardware_path()
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a directory; give a file name such as "
                                f"{out / 'hardware.json'}")
    if args.train_tokens < 1:
        raise ValueError(f"--train-tokens must be a positive integer, got {args.train_tokens}")
    entry = measure(args.device, quick=args.quick, label=args.label, model=args.model, train_tokens=args.train_tokens,
                    log=lambda s: print(s, file=sys.stderr))
    atomic_write_text(out, json.dumps(entry.to_dict(), indent=2) + "\n")
    ratios = {f"gemv_{k}_vs_stream": round(v / entry.hbm_gb_s, 3) for k, v in entry.gemv_gb_s.items()}
    ratios["gemm_bf16_vs_fp32"] = round(entry.tflops["bf16"] / entry.tflops["fp32"], 3)
    print(json.dumps({"hardware": entry.to_dict(), "ratios": ratios, "written": str(out)}, indent=2))
    return 0


__all__ = ["measure"]
