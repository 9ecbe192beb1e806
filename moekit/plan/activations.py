"""Activation bytes autograd keeps per token and layer: the memory model's (train.py) and the step model's
(step_time.py, which scales its memory-bound traffic by them) one formula.

    from moekit.plan.activations import activation_bytes
    activation_bytes(cfg, moe_layer=True, tp=8, sequence_parallel=True)     # bytes per token per layer per GPU

bf16, FlashAttention (no s x s scores stored): norm inputs/outputs, Q, K, V, attention output, the MLP hidden before
and after the activation, for MoE the k gathered token copies and expert outputs; split by tp, fully with sequence
parallelism and except the d_model-sized ones without (Korthikanti et al. 2022, section 4).
"""

from __future__ import annotations

from moekit.config import ModelConfig
from moekit.plan.layout import kv_heads_per_gpu


def activation_bytes(cfg: ModelConfig, moe_layer: bool, tp: int, sequence_parallel: bool) -> float:
    """Bytes autograd keeps for one token of one layer on one GPU (bf16, FlashAttention)."""
    h, f = cfg.d_model, (cfg.d_ff if moe_layer else cfg.dense_d_ff)
    kv = kv_heads_per_gpu(cfg, tp) * cfg.head_dim  # replicated when fewer KV heads than tp
    hidden = (4 if cfg.mlp == "swiglu" else 2) * f  # gelu: fc1 out, gelu out; swiglu: w1, w3, silu, product
    k = cfg.top_k if moe_layer else 1
    # d_model-sized tensors: both norms' input and output, and for MoE the k gathered copies and outputs.
    wide = 4 * h + (2 * k * h if moe_layer else 0)
    split = (2 * cfg.q_dim + k * hidden) / tp + 2 * kv  # Q, attention output, MLP hidden; K and V
    router = 2 * cfg.n_expert if moe_layer else 0  # fp32 logits, counted in bf16 units
    return 2 * ((wide / tp if sequence_parallel else wide) + split + router)


__all__ = ["activation_bytes"]
