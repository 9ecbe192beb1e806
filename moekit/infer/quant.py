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
with bf16 activations the products run in torch's fused int8 kernel (`fused_int8_ok`), which reads
the int8 bytes directly; elsewhere the int8 weight is cast to the activation dtype first.

What is swapped: every nn.Linear (attention projections, dense MLPs, lm_head) becomes
`Int8Linear`; every MoE becomes `Int8MoE`, whose expert weights are int8 buffers. The input
embedding keeps its float weights (a lookup reads one row per token); a tied lm_head gets its own
int8 copy. The model code is unchanged (DESIGN.md: quantization is applied from outside).

Shape legend: E experts, D d_model, F expert hidden, N routed assignments, T tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.model.grouped import activation
from moekit.model.moe import MoE
from moekit.model.transformer import Transformer

QMAX = 127  # symmetric: -127..127, so that negation is exact
_int8pack_mm = getattr(torch.ops.aten, "_weight_int8pack_mm", None)  # (x (M, in), W_q (out, in), scale (out))


def fused_int8_ok(x: torch.Tensor, in_features: int) -> bool:
    """Whether torch's fused int8 weight-only GEMM (aten._weight_int8pack_mm, the CPU kernel of gpt-fast's
    and torchao's int8 weight-only path) takes this product. It reads the int8 weight as it is, where the
    plain path first writes a dequantized copy: a (1, 512) x (512, 2048) product takes ~110 us against
    ~250 us for the fp32 weight (2-core AVX-512 CPU, November 2026). CPU and bf16 activations only (with
    fp32 activations it ran 8x slower), and `in` a multiple of 16: other widths crashed the process
    (torch 2.14), so they take the plain path."""
    return (_int8pack_mm is not None and x.device.type == "cpu" and x.dtype == torch.bfloat16
            and in_features % 16 == 0)


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
        if fused_int8_ok(x, self.in_features):
            y = _int8pack_mm(x.reshape(-1, self.in_features).contiguous(), self.weight, self.scales.to(x.dtype))
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y + self.bias.to(x.dtype) if self.bias is not None else y


class Int8MoE(MoE):
    """An MoE whose stacked expert weights are int8 with per-(expert, output column) scales.

    Routing, losses and `RoutingInfo` are MoE's own; only the two dispatch paths that read expert
    weights change: `_sorted` (prefill, large batches: a loop over the used experts, each one's int8
    weights read once) and `_gather` (decode: the routed experts' int8 weights gathered, one batched
    matmul). Both scale the matmul's output (gpt-fast `ConditionalFeedForwardInt8`).
    """

    @classmethod
    def from_float(cls, moe: MoE, dtype: torch.dtype) -> Int8MoE:
        moe.__class__ = cls  # keep the router, config and dispatch; replace the weights below
        for name in ("w1", "w2", "w3"):
            w = moe._parameters.pop(name, None)
            if w is None:  # no w3 in a GELU MLP
                setattr(moe, f"{name}_q", None)
                continue
            # Stored (E, out, in), as nn.Linear and the fused kernel want: one expert's slice is contiguous.
            q, scale = quantize_per_channel(w.transpose(1, 2), reduce_dim=2)  # (E, out, in) -> scale (E, out)
            moe.register_buffer(f"{name}_q", q.contiguous())
            moe.register_buffer(f"{name}_scale", scale.to(dtype))
        return moe

    def _dtype(self, x: torch.Tensor) -> torch.dtype:
        dev = x.device.type
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype

    def _weights(self, x: torch.Tensor):  # every expert, dequantized (MoE's training path; not used here)
        dtype = self._dtype(x)

        def deq(name):
            q_EOI = getattr(self, f"{name}_q")
            if q_EOI is None:
                return None
            return (q_EOI.to(dtype) * getattr(self, f"{name}_scale").to(dtype)[:, :, None]).transpose(1, 2)

        return deq("w1"), deq("w2"), deq("w3")

    def _mm(self, x_MI: torch.Tensor, name: str, e: torch.Tensor | int) -> torch.Tensor:
        """x @ W_q[e]^T * scale[e]: the int8 weights of expert(s) e, read once, scaled after the matmul."""
        q_OI, scale = getattr(self, f"{name}_q")[e], getattr(self, f"{name}_scale")[e]
        if isinstance(e, int) and fused_int8_ok(x_MI, q_OI.shape[-1]):
            return _int8pack_mm(x_MI.contiguous(), q_OI, scale.to(x_MI.dtype))
        return torch.matmul(x_MI, q_OI.transpose(-1, -2).to(x_MI.dtype)) * scale.to(x_MI.dtype).unsqueeze(-2)

    def _sorted(self, x_TD, expert_N, weight_N, keep_N):
        """Prefill / large batches: each used expert's int8 weights are read once for all its tokens.

        Inference only (no autograd): MoE's grouped kernel would need every expert dequantized.
        """
        token_N = torch.arange(x_TD.shape[0], device=x_TD.device).repeat(self.top_k)
        if keep_N is not None:
            token_N, expert_N, weight_N = token_N[keep_N], expert_N[keep_N], weight_N[keep_N]
        dtype = self._dtype(x_TD)
        order_N = torch.argsort(expert_N, stable=True)
        counts = torch.bincount(expert_N, minlength=self.n_expert).tolist()  # one host sync, as MoE's
        y_TD = torch.zeros_like(x_TD)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            idx = order_N[start:start + n]
            start += n
            x_nD = x_TD.index_select(0, token_N[idx]).to(dtype)
            h3 = self._mm(x_nD, "w3", e) if self.w3_q is not None else None
            y_nD = self._mm(activation(self._mm(x_nD, "w1", e), h3), "w2", e).to(x_TD.dtype)
            y_TD.index_add_(0, token_N[idx], y_nD * weight_N[idx, None])
        return y_TD

    def _gather(self, x_TD, expert_N, weight_N, keep_N):
        """Decode: gather the routed experts' int8 weights per assignment, one batched matmul, no host sync."""
        token_N = torch.arange(x_TD.shape[0], device=x_TD.device).repeat(self.top_k)
        if keep_N is not None:
            token_N, expert_N, weight_N = token_N[keep_N], expert_N[keep_N], weight_N[keep_N]
        x_N1D = x_TD.index_select(0, token_N).unsqueeze(1).to(self._dtype(x_TD))
        h3 = self._mm(x_N1D, "w3", expert_N) if self.w3_q is not None else None
        y_N1D = self._mm(activation(self._mm(x_N1D, "w1", expert_N), h3), "w2", expert_N)
        y_ND = y_N1D.squeeze(1).to(x_TD.dtype) * weight_N[:, None]
        return torch.zeros_like(x_TD).index_add_(0, token_N, y_ND)


def quantize_int8(model: Transformer) -> Transformer:
    """Swap every nn.Linear and MoE of `model` for its int8 version, in place; returns the model."""
    dtype = model.tok_emb.weight.dtype
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child, dtype).to(child.weight.device))
            elif isinstance(child, MoE) and not isinstance(child, Int8MoE):
                Int8MoE.from_float(child, dtype)
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
