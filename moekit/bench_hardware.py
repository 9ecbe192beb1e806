"""`moekit bench hardware`: measure this machine and write its entry in the hardware table's format.

    moekit bench hardware                       # CUDA if available, else CPU; 5-20 s
    moekit bench hardware --device cpu --out my_cpu.json
    moekit plan serve --model tiny --gpu local --tp 1 --pp 1 --batch 8    # plan with what was measured

Three hardware figures, each the best of repeated timed runs (as STREAM reports its best rate), with the
accelerator synchronized around every timing:
- streaming memory read bandwidth: sum a buffer larger than the last-level cache (256 MB on CPU,
  2 GB on GPU);
- GEMV bandwidth per dtype: bytes of W / time of y = W x, the kernel decoding reads weights with;
- GEMM FLOP/s per dtype: 2 n^3 / time of an n x n matmul (fp32 with PyTorch's default precision);
and moekit's own engine overhead per layer and per decode step (`engine_overhead_us`), which the
planner adds to the bandwidth and compute times so that it predicts moekit's speed on this machine.
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

DTYPES = ("fp32", "bf16")
# (streaming buffer bytes, GEMV matrix bytes, largest GEMM n) per device kind and size.
SIZES = {("cpu", False): (256e6, 128e6, 2048), ("cuda", False): (2e9, 1e9, 8192),
         ("cpu", True): (4e6, 2e6, 128), ("cuda", True): (16e6, 8e6, 256)}


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


def measure(device: str | None = None, quick: bool = False, label: str | None = None,
            log: Callable[[str], None] = lambda s: None) -> GPU:
    """Measure `device` ("cpu", "cuda", "cuda:1"; default CUDA if available) and return its hardware entry."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to PyTorch; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {device!r}")
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    stream_bytes, gemv_bytes, gemm_max = SIZES[(dev.type, quick)]
    min_time = 0.05 if quick else 0.5
    dt_of = {"fp32": torch.float32, "bf16": torch.bfloat16}

    buf = torch.ones(int(stream_bytes // 4), dtype=torch.float32, device=dev)
    t = _best_time(buf.sum, sync, min_time)
    stream = buf.numel() * 4 / t / 1e9
    log(f"memory read      {stream:,.1f} GB/s  ({stream_bytes / 1e6:,.0f} MB buffer)")
    buf = None  # free it before the matmuls

    gemv, tflops = {}, {}
    for name in DTYPES:
        dtype = dt_of[name]
        size = torch.finfo(dtype).bits // 8
        n = int(math.sqrt(gemv_bytes / size))
        w, v = torch.randn(n, n, device=dev).to(dtype), torch.randn(n, device=dev).to(dtype)
        t = _best_time(lambda w=w, v=v: w @ v, sync, min_time)
        gemv[name] = n * n * size / t / 1e9
        log(f"GEMV {name:<5}      {gemv[name]:,.1f} GB/s  ({n} x {n})")
        w = v = None
        n = 256 if not quick else 64
        while True:  # grow the matmul until one call is long enough to time well, or reaches the cap
            a, b = torch.randn(n, n, device=dev).to(dtype), torch.randn(n, n, device=dev).to(dtype)
            t = _best_time(lambda a=a, b=b: a @ b, sync, min_time / 4 if n < gemm_max else min_time)
            if n >= gemm_max or t > 0.1:
                break
            n *= 2
        tflops[name] = 2 * n**3 / t / 1e12
        log(f"GEMM {name:<5}      {tflops[name] * 1e3:,.1f} GFLOP/s  ({n} x {n})")
        a = b = None

    layer_us, step_us = engine_overhead_us(dev, quick, sync)
    log(f"engine overhead  {layer_us:,.0f} us per layer, {step_us:,.0f} us per decode step")

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
               gemv_gb_s={k: round(v, 3) for k, v in gemv.items()},
               gpus_per_node=per_node, bandwidth_efficiency=1.0, flops_efficiency=1.0,
               layer_overhead_us=round(layer_us, 1), step_overhead_us=round(step_us, 1),
               source=f"measured by `moekit bench hardware` on {time.strftime('%Y-%m-%d')}: {what}, "
                      f"torch {torch.__version__}{' (quick sizes)' if quick else ''}")


def engine_overhead_us(dev, quick: bool, sync: Callable[[], None]) -> tuple[float, float]:
    """(per layer, per decode step) microseconds that moekit's engine spends beyond reading and computing:
    batch-1 decode of two narrow models with gpt4-mini's structure (16 experts, top-2, MQA) at d_model 64,
    with 2 and 8 layers, whose weights take next to no time to read. The slope over the layers is the
    per-layer part (kernel launches, dispatch), the rest of the 2-layer step the per-step part
    (scheduling, sampling). On a GPU the engine replays CUDA graphs, so this is their floor."""
    import torch

    from moekit.infer.engine import Engine
    from moekit.infer.sampler import SamplingParams
    from moekit.model.transformer import Transformer
    from moekit.presets import get_preset

    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    steps = 4 if quick else 32
    seconds = {}
    for n_layer in (2, 8):
        cfg = get_preset("gpt4-mini").replace(n_layer=n_layer, d_model=64, n_head=4, head_dim=16, d_ff=64,
                                              vocab_size=512, max_seq_len=256)
        torch.manual_seed(0)
        engine = Engine(Transformer(cfg).to(dev, dtype), num_blocks=32, block_size=16)
        engine.add_request([1] * 16, SamplingParams(temperature=0, max_tokens=4 * steps + 8, ignore_eos=True))
        for _ in range(8):  # the prefill, then warm-up decode steps (and the graph capture on a GPU)
            engine.step()
        best = math.inf
        for _ in range(3):  # best of three windows: noise only slows
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                engine.step()
            sync()
            best = min(best, (time.perf_counter() - t0) / steps)
        seconds[n_layer] = best
        while engine.has_unfinished():
            engine.step()
    per_layer = max(seconds[8] - seconds[2], 0.0) / 6
    return per_layer * 1e6, max(seconds[2] - 2 * per_layer, 0.0) * 1e6


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    p.add_argument("--out", help=f"where to write the entry (default {local_hardware_path()})")
    p.add_argument("--label", help="the entry's name (default local-cpu / local-cuda)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the plumbing, not the machine")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else local_hardware_path()
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a directory; give a file name such as "
                                f"{out / 'hardware.json'}")
    entry = measure(args.device, quick=args.quick, label=args.label, log=lambda s: print(s, file=sys.stderr))
    atomic_write_text(out, json.dumps(entry.to_dict(), indent=2) + "\n")
    ratios = {f"gemv_{k}_vs_stream": round(v / entry.hbm_gb_s, 3) for k, v in entry.gemv_gb_s.items()}
    ratios["gemm_bf16_vs_fp32"] = round(entry.tflops["bf16"] / entry.tflops["fp32"], 3)
    print(json.dumps({"hardware": entry.to_dict(), "ratios": ratios, "written": str(out)}, indent=2))
    return 0


__all__ = ["measure"]
