"""Products of a few rows on a CPU: x @ w^T as one batched product over two halves of w's rows.

Decoding multiplies a handful of rows (one per sequence, a few more under speculative verification) by every
weight, so its speed is the rate at which these products read the weights. In fp32 on a CPU, torch's plain
product (F.linear, mm with a transposed operand) runs such a matrix-vector product on one thread and reads the
transposed operand slowly; `torch.bmm` over the weight's two halves of rows spreads them over the cores and reads
each row contiguously. Measured on cold weights (sets larger than the caches), 2 cores, AVX2 (AMD EPYC), torch
2.14, fp32, split vs plain, microseconds per product:

    weight (out x in)   1 row         4 rows
    32000 x 512         3,379 / 4,981  4,145 / 19,108   (gpt4-mini's lm_head)
    2048 x 512            217 / 337      277 / 839      (an expert's w1)
    512 x 512              77 / 98        96 / 212      (wq, wo)
    64 x 512               33 / 17        36 / 38       (MQA's wk, wv: plain wins; MIN_OUT keeps them plain)

bf16 runs in oneDNN, fastest in the plain form, and a GPU's GEMV is fine as it is: both keep the plain product.
Tensor-parallel (DTensor) weights do too. Above MAX_ROWS rows (prefill, training) the plain GEMM is efficient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 32
MIN_OUT = 512


def split_ok(x_nI: torch.Tensor, w_OI: torch.Tensor) -> bool:
    """Does x @ w^T take the split product (module docstring)?"""
    n_out = w_OI.shape[0]
    return (x_nI.shape[0] <= MAX_ROWS and n_out >= MIN_OUT and n_out % 2 == 0 and x_nI.device.type == "cpu"
            and x_nI.dtype in (torch.float32, torch.float64) and w_OI.dtype == x_nI.dtype
            and not hasattr(w_OI, "to_local"))


def mm_t(x_nI: torch.Tensor, w_OI: torch.Tensor, out_nO: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w^T (into `out_nO` if given): split over w's two halves of rows where that is faster (`split_ok`)."""
    if split_ok(x_nI, w_OI):
        n, n_out = x_nI.shape[0], w_OI.shape[0]
        halves = torch.bmm(w_OI.view(2, n_out // 2, -1), x_nI.t().expand(2, -1, -1))  # (2, out/2, n)
        y_nO = halves.view(n_out, n).t()
        if out_nO is None:
            return y_nO.contiguous()
        return out_nO.copy_(y_nO)
    if out_nO is None:
        return F.linear(x_nI, w_OI)
    return torch.mm(x_nI, w_OI.t(), out=out_nO)


class Linear(nn.Linear):
    """nn.Linear (same parameters, state dict and initialization) whose products of a few rows use `mm_t`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Anything but the split product is nn.Linear's own call, bias fused as there: tensor-parallel DTensors
        # (their collectives are counted and planned: moekit/plan/serve_workers.py) and bitwise results unchanged.
        if x.device.type == "cpu" and x.numel() <= MAX_ROWS * self.in_features and not hasattr(x, "to_local"):
            x_nI = x.reshape(-1, self.in_features)
            if split_ok(x_nI, self.weight):
                y = mm_t(x_nI, self.weight).view(*x.shape[:-1], self.out_features)
                return y + self.bias if self.bias is not None else y
        return F.linear(x, self.weight, self.bias)
