"""int8 weight-only quantization with per-output-channel scales, applied to a model from outside.

    quantize_int8(model)       # in place; `moekit generate --quantize int8`

SPEC section 4: GPT-4 is served in < 15 GB per GPU "in FP8/int8". Decoding reads every active
weight once per token, so 1-byte weights halve the bytes read against bf16 (a quarter against
fp32); activations, the KV cache, norms and the router stay in floating point.

The scheme is gpt-fast's `WeightOnlyInt8QuantHandler` (quantize.py): for each output channel c,
scale_c = max_i |W[c, i]| / 127 and W_q = round(W / scale_c) in [-127, 127]; the layer computes
(x @ W_q^T) * scale, the scale applied to the matmul's output (exact for a per-output scale, and
cheaper than dequantizing the weight first). The stacked expert weights are stored (E, out, in)
with a scale per expert and output channel, as gpt-fast's `ConditionalFeedForwardInt8`. On a CPU
the products run in torch's fused int8 kernel (`fused_int8_ok`), which reads the int8 bytes directly:
always with bf16 activations, and with fp32 ones for the few rows of a decode step (`int8_product`);
elsewhere the int8 weight is cast to the activation dtype first.

What is swapped: every nn.Linear (attention projections, dense MLPs, lm_head) becomes
`Int8Linear`; every MoE's `Experts` module becomes `Int8Experts`, whose weights are int8 buffers. The input
embedding keeps its float weights (a lookup reads one row per token); a tied lm_head gets its own
int8 copy. The model code is unchanged (DESIGN.md: quantization is applied from outside).

Shape legend: E experts, D d_model, F expert hidden, N routed assignments, T tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.model.grouped import activation
from moekit.model.moe import Experts
from moekit.model.transformer import Transformer

QMAX = 127  # symmetric: -127..127, so that negation is exact
_int8pack_mm = getattr(torch.ops.aten, "_weight_int8pack_mm", None)  # (x (M, in), W_q (out, in), scale (out))


# fp32 activations take the fused kernel (rounded to bf16 on the way in and out) up to this many rows: it reads the
# int8 weight once but runs ~70 us per row of a (512 -> 2048) product, where the plain path's dequantized copy
# costs ~500 us once and then runs as an fp32 GEMM. Measured on 24 cold 512 x 2048 weights, 2 cores, AVX2 (AMD
# EPYC, no bf16 units), torch 2.14, fused vs plain: 1 row 177 vs 688 us, 8 rows 644 vs 1,534, 32 rows 2,239 vs
# 2,388, 64 rows 4,388 vs 3,557. Decode and speculative verification sit far below the crossover, prefill above.
FUSED_FP32_MAX_ROWS = 32


def fused_int8_ok(x: torch.Tensor, in_features: int) -> bool:
    """Whether torch's fused int8 weight-only GEMM (aten._weight_int8pack_mm, the CPU kernel of gpt-fast's
    and torchao's int8 weight-only path) takes this product. It reads the int8 weight as it is, where the
    plain path first writes a dequantized copy: a (1, 512) x (512, 2048) product takes ~110 us against
    ~250 us for the fp32 weight (2-core AVX-512 CPU, November 2026). CPU only, and `in` a multiple of 16: other
    widths crashed the process (torch 2.14), so they take the plain path. bf16 activations always; fp32 ones up
    to FUSED_FP32_MAX_ROWS rows, through bf16 (the kernel on fp32 inputs ran 4x slower than the plain path)."""
    if _int8pack_mm is None or x.device.type != "cpu" or in_features % 16:
        return False
    if x.dtype == torch.bfloat16:
        return True
    return x.dtype == torch.float32 and x.numel() <= FUSED_FP32_MAX_ROWS * in_features


def int8_product(x_MI: torch.Tensor, q_OI: torch.Tensor, scale_O: torch.Tensor) -> torch.Tensor:
    """x @ (q * scale)^T for int8 weights q (out, in) with a scale per output channel, in x's dtype.

    Fused (`fused_int8_ok`): bf16 activations go in as they are; fp32 ones are rounded to bf16 for the kernel,
    which returns bf16, and the fp32 scale is applied after it (a bf16 scale would round it too). So with fp32
    activations a decode step's int8 products carry bf16's rounding of their inputs and outputs, as a bf16 model's
    do, while the residual stream, norms, attention and softmax stay fp32; a product of more rows (prefill) is
    exact against the dequantized fp32 weights. Plain: the int8 weight cast to x's dtype, the scale applied to
    the product's output (exact for a per-output scale)."""
    if fused_int8_ok(x_MI, q_OI.shape[-1]):
        if x_MI.dtype == torch.bfloat16:
            return _int8pack_mm(x_MI.contiguous(), q_OI, scale_O.to(torch.bfloat16))
        ones_O = torch.ones(q_OI.shape[0], dtype=torch.bfloat16, device=x_MI.device)
        return _int8pack_mm(x_MI.to(torch.bfloat16), q_OI, ones_O).to(x_MI.dtype) * scale_O.to(x_MI.dtype)
    return torch.matmul(x_MI, q_OI.transpose(-1, -2).to(x_MI.dtype)) * scale_O.to(x_MI.dtype).unsqueeze(-2)


def quantize_per_channel(w: torch.Tensor, reduce_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scale) with one scale per slice along every dim except `reduce_dim`."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=reduce_dim, keepdim=True) / QMAX).clamp_min(1e-12)  # an all-zero channel: scale ~0
    q = torch.round(w / scale).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale.squeeze(reduce_dim)


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        q, scale = quantize_per_channel(linear.weight, reduce_dim=1)  # weight (out, in): a scale per row
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", q)
        self.register_buffer("scales", scale.to(dtype))
        self.bias = nn.Parameter(linear.bias.detach().to(dtype)) if linear.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_product(x.reshape(-1, self.in_features), self.weight, self.scales)
        y = y.view(*x.shape[:-1], self.out_features)
        return y + self.bias.to(x.dtype) if self.bias is not None else y


class Int8Experts(nn.Module):
    """`Experts` with int8 weights (E, out, in) and per-(expert, output channel) scales, swapped in for a
    float `Experts` module: the MoE's router, routing, losses and `RoutingInfo` are untouched.

    Both kernels of `Experts` (moekit/model/moe.py) with int8 weights, each scaling the matmul's output
    (gpt-fast `ConditionalFeedForwardInt8`): `forward` (prefill, large batches: rows sorted by expert,
    each used expert's int8 weights read once) and `gather` (decode: the routed experts' int8 weights
    gathered per row, one batched matmul, no host sync). Inference only: no autograd.
    """

    def __init__(self, experts: Experts, dtype: torch.dtype):
        super().__init__()
        self.n_expert = experts.n_expert
        for name in ("w1", "w2", "w3"):
            w_EOI = getattr(experts, name)
            if w_EOI is None:  # no w3 in a GELU MLP
                self.register_buffer(f"{name}_q", None)
                self.register_buffer(f"{name}_scale", None)
                continue
            q, scale = quantize_per_channel(w_EOI, reduce_dim=2)  # (E, out, in): a scale per (E, out)
            self.register_buffer(f"{name}_q", q.contiguous())
            self.register_buffer(f"{name}_scale", scale.to(dtype))

    def _mm(self, x_MI: torch.Tensor, name: str, e: torch.Tensor | int) -> torch.Tensor:
        """x @ W_q[e]^T * scale[e]: the int8 weights of expert(s) e, read once, scaled after the matmul."""
        q_OI, scale = getattr(self, f"{name}_q")[e], getattr(self, f"{name}_scale")[e]
        if isinstance(e, int):  # one expert's (out, in) weight: the fused kernel where it applies
            return int8_product(x_MI, q_OI, scale)
        return torch.matmul(x_MI, q_OI.transpose(-1, -2).to(x_MI.dtype)) * scale.to(x_MI.dtype).unsqueeze(-2)

    def _mlp(self, x, e):
        h3 = self._mm(x, "w3", e) if self.w3_q is not None else None
        return self._mm(activation(self._mm(x, "w1", e), h3), "w2", e)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        y_ND = torch.zeros_like(x_ND)  # rows past the experts' slices: dropped assignments, no output
        start = 0
        for e, n in enumerate(counts_E.tolist()):  # one host sync, as Experts' loop
            if n:
                y_ND[start:start + n] = self._mlp(x_ND[start:start + n], e)
                start += n
        return y_ND

    def gather(self, x_ND: torch.Tensor, expert_N: torch.Tensor) -> torch.Tensor:
        return self._mlp(x_ND.unsqueeze(1), expert_N).squeeze(1)

    def capturable(self, dispatch: str, dtype: torch.dtype) -> bool:
        return dispatch == "gather"  # the sorted loop reads its slice sizes on the host


def quantize_int8(model: Transformer) -> Transformer:
    """Swap every nn.Linear for an Int8Linear and every Experts for an Int8Experts, in place; returns the model."""
    dtype = model.tok_emb.weight.dtype
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child, dtype).to(child.weight.device))
            elif isinstance(child, Experts):
                setattr(parent, name, Int8Experts(child, dtype).to(child.w1.device))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (tied tensors once): what decoding reads, at most."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
