"""What a training step's parts reach on this machine, at a model's own shapes (`moekit bench hardware`):

    from moekit.train_profile import gemm_rates, attention_rates, elementwise_gb_s
    elementwise_gb_s(get_preset("gpt4-mini"), tokens=4096, dtype="fp32", dev=torch.device("cpu"))
    gemm_rates(get_preset("gpt4-mini"), tokens=4096, dtype="fp32", dev=torch.device("cpu"))  # {"4096,1152,512": ..}
    attention_rates(get_preset("gpt4-mini"), seq_len=1024, dtype="fp32", dev=torch.device("cpu"))  # fwd / bwd

The planner's training step (moekit/plan/step_time.py) is matmuls at their shapes' efficiency + attention +
memory-bound ops + the optimizer. On a datasheet GPU those efficiencies come from published profiles (gemm.py); a
measured entry takes them from here, so that `moekit plan train --gpu local` predicts moekit's own step
(bench/train_step.py prints measured / predicted):

- `gemm_rates`: TFLOP/s of every GEMM the planner counts in one layer of each kind and in the lm_head at `tokens`
  tokens (step_time.layer_gemms: fused QKV, output projection, router, the experts at their balanced rows, the
  vocabulary projection), each forward (x W^T, as nn.Linear runs it) and both backward products as autograd runs
  them (the input gradient g W, the weight gradient g^T x), keyed by the (m, n, k) the planner asks about. On a
  2-core AVX2 CPU the gpt4-mini training shapes ran at ~60% of an n = 2048 square product's rate.
- `attention_rates`: FLOP/s of causal scaled-dot-product attention (the model's call, MQA/GQA included) forward and
  backward at the model's heads and `seq_len`, counted as the planner counts them (forward 2 b s^2 q_dim, backward
  2.5x that: FlashAttention-2's five matmuls against two).
- `elementwise_gb_s`: the bandwidth of a memory-bound op as eager PyTorch runs one (x + y into a fresh tensor, at
  the step's activation sizes), at which the planner moves the memory-bound ops' bytes. A streaming sum reads faster
  than any op that writes: on a 2-core CPU a fresh 32 MB output ran at ~2.5 GB/s (first-touch page faults: glibc
  maps allocations that large anew) where an 8 MB one ran at ~13 and the sum at ~17.

Best-of timings (noise only slows), the accelerator synchronized around each.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from moekit.config import ModelConfig

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def shape_key(m: float, n: float, k: float) -> str:
    return f"{int(m)},{int(n)},{int(k)}"


def _best(fn: Callable[[], object], dev: torch.device, repeats: int) -> float:
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    fn()
    sync()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_rates(cfg: ModelConfig, tokens: int, dtype: str, dev: torch.device, repeats: int = 3) -> dict[str, float]:
    """{"m,n,k": TFLOP/s} of the step's GEMMs at `tokens` tokens per micro-batch (module docstring)."""
    from moekit.plan.step_time import layer_gemms

    dt = TORCH_DTYPES[dtype]
    shapes = {(m, n, k) for moe in {False, cfg.is_moe} for m, n, k, _ in layer_gemms(cfg, moe, tokens, 1, 1)}
    shapes.add((tokens, cfg.vocab_size, cfg.d_model))
    out: dict[str, float] = {}
    for m, n, k in sorted(shapes):
        x, w, g = (torch.randn(*s, device=dev).to(dt) for s in ((m, k), (n, k), (m, n)))
        flops = 2 * m * n * k
        for key, fn in ((shape_key(m, n, k), lambda x=x, w=w: F.linear(x, w)),  # forward: x W^T
                        (shape_key(m, k, n), lambda g=g, w=w: torch.mm(g, w)),  # input gradient: g W
                        (shape_key(k, n, m), lambda g=g, x=x: torch.mm(g.t(), x))):  # weight gradient: g^T x
            out[key] = flops / _best(fn, dev, repeats) / 1e12
    return out


def attention_rates(cfg: ModelConfig, seq_len: int, dtype: str, dev: torch.device, batch: int = 1,
                    repeats: int = 2) -> dict[str, float]:
    """{"fwd": TFLOP/s, "bwd": TFLOP/s} of the model's causal attention call (module docstring)."""
    dt = TORCH_DTYPES[dtype]
    q = torch.randn(batch, cfg.n_head, seq_len, cfg.head_dim, device=dev).to(dt).requires_grad_()
    k, v = (torch.randn(batch, cfg.n_kv_head, seq_len, cfg.head_dim, device=dev).to(dt).requires_grad_()
            for _ in range(2))
    gqa = cfg.n_kv_head != cfg.n_head

    def fwd():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

    out = fwd()
    grad = torch.randn_like(out)
    t_fwd = _best(fwd, dev, repeats)

    def fwd_bwd():
        torch.autograd.grad(fwd(), (q, k, v), grad)

    t_bwd = max(_best(fwd_bwd, dev, repeats) - t_fwd, 1e-9)
    flops = 2 * batch * seq_len * seq_len * cfg.n_head * cfg.head_dim  # step_time._attention's count
    return {"fwd": flops / t_fwd / 1e12, "bwd": 2.5 * flops / t_bwd / 1e12}


def elementwise_gb_s(cfg: ModelConfig, tokens: int, dtype: str, dev: torch.device, repeats: int = 5) -> float:
    """GB/s of an eager elementwise op with a fresh output (x + y) on the step's activations: (tokens, d_model) and
    (tokens, d_ff) tensors, bytes read and written over the time of both (module docstring)."""
    dt = TORCH_DTYPES[dtype]
    moved = seconds = 0.0
    for width in (cfg.d_model, cfg.d_ff):
        x, y = (torch.randn(tokens, width, device=dev).to(dt) for _ in range(2))
        seconds += _best(lambda x=x, y=y: x + y, dev, repeats)
        moved += 3 * x.numel() * x.element_size()
    return moved / seconds / 1e9


__all__ = ["attention_rates", "elementwise_gb_s", "gemm_rates", "shape_key"]
