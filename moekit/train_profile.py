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
- `elementwise_gb_s`: the bandwidth of the memory-bound ops a layer runs, as eager PyTorch runs them (a norm, the
  activation, a residual add, forward and backward, at the step's activation sizes), at which the planner moves the
  memory-bound ops' bytes. A streaming sum reads faster than any op that writes and computes: on a 2-core AVX2 CPU
  GELU forward and backward moved ~2-5 GB/s where the sum read ~17.

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


def gemm_rates(cfg: ModelConfig, tokens: int, dtype: str, dev: torch.device, repeats: int = 3,
               cold_bytes: float = 96e6) -> dict[str, float]:
    """{"m,n,k": TFLOP/s} of the step's GEMMs at `tokens` tokens per micro-batch (module docstring). Each shape is
    timed over enough distinct operand sets to fill `cold_bytes` (3x this CPU's last-level cache), one after the
    other, as a step runs its layers: the same operands timed again and again sit in the cache, which no step's do
    (on a 2-core CPU that read 35% faster than the step's own matmuls)."""
    from moekit.plan.step_time import layer_gemms

    dt = TORCH_DTYPES[dtype]
    size = torch.finfo(dt).bits // 8
    shapes = {(m, n, k) for moe in {False, cfg.is_moe} for m, n, k, _ in layer_gemms(cfg, moe, tokens, 1, 1)}
    shapes.add((tokens, cfg.vocab_size, cfg.d_model))
    out: dict[str, float] = {}
    for m, n, k in sorted(shapes):
        sets = max(1, math.ceil(cold_bytes / ((m * k + n * k + m * n) * size)))
        xs, ws, gs = ([torch.randn(*s, device=dev).to(dt) for _ in range(sets)] for s in ((m, k), (n, k), (m, n)))
        flops = 2 * m * n * k * sets
        for key, op, a, b in ((shape_key(m, n, k), F.linear, xs, ws),  # forward: x W^T
                              (shape_key(m, k, n), torch.mm, gs, ws),  # input gradient: g W
                              (shape_key(k, n, m), lambda g, x: torch.mm(g.t(), x), gs, xs)):  # weight gradient
            def run(op=op, a=a, b=b):
                return [op(p, q) for p, q in zip(a, b, strict=True)]

            out[key] = flops / _best(run, dev, repeats) / 1e12
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


def elementwise_gb_s(cfg: ModelConfig, tokens: int, dtype: str, dev: torch.device, repeats: int = 3) -> float:
    """GB/s of the memory-bound ops a layer runs, as eager PyTorch runs them on the step's activations: a norm, the
    MLP's activation and a residual add, forward and backward, on (tokens, d_model) and (tokens, d_ff) tensors; the
    bytes each reads and writes over their time (module docstring)."""
    dt = TORCH_DTYPES[dtype]
    d, f = cfg.d_model, cfg.d_ff
    x, r, gx = (torch.randn(tokens, d, device=dev).to(dt) for _ in range(3))
    h, gh = (torch.randn(tokens, f, device=dev).to(dt) for _ in range(2))
    w = torch.ones(d, device=dev).to(dt)
    mean, rstd = (t.float() for t in torch.ops.aten.native_layer_norm(x, [d], w, None, 1e-5)[1:])
    xb, hb = x.numel() * x.element_size(), h.numel() * h.element_size()
    ops = [(lambda: x + r, 3 * xb),  # residual: read 2, write 1
           (lambda: F.layer_norm(x, [d], w), 2 * xb),
           (lambda: torch.ops.aten.native_layer_norm_backward(gx, x, [d], mean.to(dt), rstd.to(dt), w, None,
                                                               [True, False, False]), 3 * xb),
           (lambda: F.gelu(h), 2 * hb),
           (lambda: torch.ops.aten.gelu_backward(gh, h), 3 * hb)]
    seconds = sum(_best(fn, dev, repeats) for fn, _ in ops)
    return sum(b for _, b in ops) / seconds / 1e9


__all__ = ["attention_rates", "elementwise_gb_s", "gemm_rates", "shape_key"]
