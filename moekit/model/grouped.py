"""Grouped expert MLP: every expert runs on its contiguous slice of expert-sorted tokens, with a
hand-written backward.

Why by hand: through autograd, a Python loop over experts makes each weight's gradient a stack of
per-expert pieces (E temporary full-size zero tensors or a final `cat`), plus a saved activation
per matmul. Here the backward writes every expert's weight gradient in place into one (E, ...)
buffer with `mm(out=...)`. Rows past the last expert's slice are dropped assignments (capacity
limit): they get no output and no gradient. On a GPU this loop is the place for
`torch._grouped_mm`; on a CPU one GEMM per expert is as fast as any (bench/moe_layer.py).

Expert weights are stored (E, out, in), as nn.Linear stores one: w1_EFD, w3_EFD, w2_EDF.
Checked against `reference.moe_loop` in outputs and every gradient (tests/test_moe.py).
Shape legend: N tokens sorted by expert, D d_model, F expert hidden, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moekit.model.linear import mm_t  # a few rows per expert (decode): split over the cores on a CPU


def activation(h1: torch.Tensor, h3: torch.Tensor | None) -> torch.Tensor:
    """GELU for the GPT-style 2-matrix MLP; SwiGLU silu(x W1) * (x W3) for Llama/Mixtral (Shazeer 2020)."""
    return F.gelu(h1) if h3 is None else F.silu(h1) * h3


class GroupedExpertMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, counts: list[int], w1_EFD, w2_EDF, w3_EFD):
        y_ND = x_ND.new_empty(x_ND.shape)
        h1_NF = x_ND.new_empty(x_ND.shape[0], w1_EFD.shape[1])
        h3_NF = torch.empty_like(h1_NF) if w3_EFD is not None else None
        a_NF = torch.empty_like(h1_NF)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            sl = slice(start, start + n)
            mm_t(x_ND[sl], w1_EFD[e], h1_NF[sl])
            if h3_NF is not None:
                mm_t(x_ND[sl], w3_EFD[e], h3_NF[sl])
            a_NF[sl] = activation(h1_NF[sl], h3_NF[sl] if h3_NF is not None else None)
            mm_t(a_NF[sl], w2_EDF[e], y_ND[sl])
            start += n
        y_ND[start:] = 0  # rows past the experts' slices: dropped assignments, no output
        ctx.counts = counts
        ctx.save_for_backward(x_ND, h1_NF, h3_NF, a_NF, w1_EFD, w2_EDF, w3_EFD)
        return y_ND

    @staticmethod
    def backward(ctx, gy_ND):
        x_ND, h1_NF, h3_NF, a_NF, w1_EFD, w2_EDF, w3_EFD = ctx.saved_tensors
        gy_ND = gy_ND.contiguous()
        gx_ND = torch.empty_like(x_ND)
        gw1, gw2 = torch.empty_like(w1_EFD), torch.empty_like(w2_EDF)
        gw3 = torch.empty_like(w3_EFD) if w3_EFD is not None else None
        start = 0
        for e, n in enumerate(ctx.counts):
            if n == 0:  # an expert no token chose: zero gradient
                gw1[e].zero_()
                gw2[e].zero_()
                if gw3 is not None:
                    gw3[e].zero_()
                continue
            sl = slice(start, start + n)
            x, h1, gy = x_ND[sl], h1_NF[sl], gy_ND[sl]
            h3 = h3_NF[sl] if h3_NF is not None else None
            torch.mm(gy.t(), a_NF[sl], out=gw2[e])  # y = a W2^T: dW2 = gy^T a
            ga = gy @ w2_EDF[e]
            if h3 is None:  # y = gelu(h1) W2^T, h1 = x W1^T
                gh1 = torch.ops.aten.gelu_backward(ga, h1)
                torch.mm(gh1, w1_EFD[e], out=gx_ND[sl])
            else:  # y = (silu(h1) * h3) W2^T, h3 = x W3^T
                gh1 = torch.ops.aten.silu_backward(ga * h3, h1)
                gh3 = ga * F.silu(h1)
                torch.mm(gh3.t(), x, out=gw3[e])
                torch.addmm(gh3 @ w3_EFD[e], gh1, w1_EFD[e], out=gx_ND[sl])
            torch.mm(gh1.t(), x, out=gw1[e])
            start += n
        gx_ND[start:] = 0
        return gx_ND, None, gw1, gw2, gw3


class DispatchRows(torch.autograd.Function):
    """x_ND = x_TD[order_N % T]: each token's K copies, sorted by expert (rank-major assignments).

    The backward is a gather too (each token sums its K gradient rows, found through the inverse
    permutation), not the scatter-add autograd would use for indexing: much faster on a CPU.
    """

    @staticmethod
    def forward(ctx, x_TD, order_N, inverse_N):
        ctx.save_for_backward(inverse_N)
        ctx.T = x_TD.shape[0]
        return x_TD.index_select(0, order_N % ctx.T)

    @staticmethod
    def backward(ctx, g_ND):
        (inverse_N,) = ctx.saved_tensors
        return g_ND.index_select(0, inverse_N).view(-1, ctx.T, g_ND.shape[-1]).sum(0), None, None


class PermuteRows(torch.autograd.Function):
    """y = x[index] for a permutation `index`; the backward is the gather g[inverse]."""

    @staticmethod
    def forward(ctx, x_ND, index_N, inverse_N):
        ctx.save_for_backward(inverse_N)
        return x_ND.index_select(0, index_N)

    @staticmethod
    def backward(ctx, g_ND):
        (inverse_N,) = ctx.saved_tensors
        return g_ND.index_select(0, inverse_N), None, None


@torch.compiler.disable  # a loop over data-dependent slice sizes: compiled, it recompiled for every new `counts`
def grouped_expert_mlp(x_ND: torch.Tensor, counts: list[int], w1_EFD: torch.Tensor, w2_EDF: torch.Tensor,
                       w3_EFD: torch.Tensor | None) -> torch.Tensor:
    """y[slice_e] = act(x W1[e]^T (, x W3[e]^T)) W2[e]^T on consecutive slices of sizes `counts`. Run eagerly inside
    a compiled block (TrainConfig.compile): the rest of the block compiles around it."""
    if torch.is_grad_enabled():
        return GroupedExpertMLP.apply(x_ND, counts, w1_EFD, w2_EDF, w3_EFD)
    return _expert_mlp_no_grad(x_ND, counts, w1_EFD, w2_EDF, w3_EFD)


def _expert_mlp_no_grad(x_ND, counts: list[int], w1_EFD, w2_EDF, w3_EFD) -> torch.Tensor:
    """GroupedExpertMLP's forward without what its backward needs (the hidden activations kept in (N, F) buffers,
    saved tensors, the autograd Function): the same products, so the same values. Decoding runs it once per MoE
    layer per step, where that bookkeeping cost ~280 us a call (of ~1.4 ms for two gpt4-mini experts on a CPU)."""
    y_ND = x_ND.new_empty(x_ND.shape)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        x_nD = x_ND[start:start + n]
        h3 = mm_t(x_nD, w3_EFD[e]) if w3_EFD is not None else None
        mm_t(activation(mm_t(x_nD, w1_EFD[e]), h3), w2_EDF[e], y_ND[start:start + n])
        start += n
    if start < y_ND.shape[0]:
        y_ND[start:] = 0  # rows past the experts' slices: dropped assignments, no output
    return y_ND


def grouped_mm_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's grouped GEMM kernel runs here: CUDA, bf16, sm80+ (torch.nn.functional.grouped_mm docs)."""
    return (device.type == "cuda" and dtype == torch.bfloat16 and hasattr(F, "grouped_mm")
            and torch.cuda.get_device_capability(device) >= (8, 0))


def grouped_mm_expert_mlp(x_ND: torch.Tensor, offs_E: torch.Tensor, w1_EFD: torch.Tensor, w2_EDF: torch.Tensor,
                          w3_EFD: torch.Tensor | None) -> torch.Tensor:
    """The same function as `grouped_expert_mlp`, with `offs_E` = cumulative slice ends (int32), through
    torch's grouped GEMM (autograd included). Rows past offs_E[-1] (dropped assignments) are masked
    on the way in and out, since the kernel leaves them unwritten."""
    valid_N1 = (torch.arange(x_ND.shape[0], device=x_ND.device) < offs_E[-1])[:, None]
    x_ND = torch.where(valid_N1, x_ND, 0)
    # The kernel takes (E, in, out) right operands: the transposed views of our (E, out, in) weights, as
    # torchtitan passes them (models/moe.py, `_run_experts_grouped_mm`).
    h3 = F.grouped_mm(x_ND, w3_EFD.transpose(1, 2), offs=offs_E) if w3_EFD is not None else None
    h1 = F.grouped_mm(x_ND, w1_EFD.transpose(1, 2), offs=offs_E)
    y_ND = F.grouped_mm(activation(h1, h3), w2_EDF.transpose(1, 2), offs=offs_E)
    return torch.where(valid_N1, y_ND, 0)
