"""CUDA graphs for decode and verification steps: one graph launch a step instead of hundreds of kernels.

Why: a gpt4-mini decode step is ~500 small kernels (8 layers of norms, projections, RoPE, cache
writes, attention, router, experts). Launched one by one from Python on an H200 they took ~20 ms per
step, so batch-1 decode ran at 49 tokens/s against a 41,000 tokens/s bandwidth roofline: bound by
the CPU, not by the GPU. Replayed as a graph the same step takes ~1.85 ms (540 tokens/s, 6-8x;
bench/decode.py, November 2026). vLLM captures the decode forward once per batch size and replays it
(vllm/v1/worker/gpu_model_runner.py, `capture_model`); gpt-fast gets the same from
`torch.compile(mode="reduce-overhead")`. This is the vLLM way, without a compiler.

How: a step whose R items each compute a few tokens and want logits for all of them (plain decode:
one token; speculative verification: the last token and k drafts) is padded to B x Q tokens: B the
next captured batch size (`BATCH_SIZES`), Q the longest item. One graph per (B, Q) seen. The graph
reads static input buffers that each step fills with one host-to-device copy: token ids, positions,
the cache slot each token writes, the last position each query may see, which tokens are real, and
each request's block table as (B, S) cache slots, S covering max_model_len. Padding tokens write
their K/V to the cache's scratch slot (`PagedKVCache.scratch_slot`), so they touch no request's
blocks; padding rows attend to that slot alone; the mask hides every slot past a query's position,
and padded queries' outputs are never read. Shapes must be static, so attention runs over S masked
slots rather than over the context: the price of one graph for every context length (vLLM's
paged-attention kernel reads only the context; masked SDPA over a gathered table is the portable
stand-in). Graphs are captured at the first step of each shape, or up front by `capture_all`
(`moekit serve` does, at start-up, as vLLM), and share one memory pool (replays never overlap).

The graph captures the model's own forward, called as the runner calls it (one pass for training,
serving and graphs). What cannot be captured runs eagerly: MoE layers with capacity dropping (padded
tokens would compete for capacity with real ones), and expert modules whose path at this batch size
syncs with the host to size their slices (`Experts.capturable`: the sorted path in fp32 or int8
above GATHER_MAX_TOKENS tokens; bf16 uses torch's grouped GEMM, which takes its offsets on the
device). Tokens per expert are counted for the real tokens only, from each layer's routed experts
(`RoutingInfo.experts_TK`), not from the padded batch.

Shape legend: B padded batch, Q queries per request (padded), T = B x Q tokens, R real requests, S
attended slots, L MoE layers, E experts, V vocabulary.
"""

from __future__ import annotations

import bisect
import math
import sys
from dataclasses import dataclass

import torch

from moekit.infer.batch import RunItem, RunOutput
from moekit.infer.runner import SHORT_QUERY, ModelRunner, dispatch_for, moe_dispatch
from moekit.model.attention import AttentionGroup, causal_mask

BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)  # vLLM's capture sizes, to 256
MAX_GATHER_BYTES = 512 << 20  # skip graphs whose (B, S) K/V gather would pass this per layer


@dataclass
class _Static:
    """One captured (B, Q): its input buffers (views of one packed int64 tensor), outputs and graph."""

    packed: torch.Tensor  # 5 x T + B x S int64 on the device: filled by one copy per step
    tokens_T: torch.Tensor
    positions_T: torch.Tensor
    slots_T: torch.Tensor  # where each token's K/V goes
    sees_T: torch.Tensor  # the last slot index (in its row's table) each query may attend to
    real_T: torch.Tensor  # 1 for real tokens, 0 for padding
    kv_slots_BS: torch.Tensor
    logits_TV: torch.Tensor | None = None
    counts_LE: torch.Tensor | None = None  # tokens per expert per MoE layer, real tokens only
    graph: torch.cuda.CUDAGraph | None = None


class DecodeGraphs:
    """Decode and verification steps of a `ModelRunner` as replayed CUDA graphs. With `capture=False`
    the same padded, static-shape forward runs eagerly: tests check it on a CPU against the runner's
    ragged forward."""

    def __init__(self, runner: ModelRunner, max_model_len: int, max_num_seqs: int, capture: bool = True):
        self.runner, self.capture = runner, capture
        self.P = runner.block_size
        self.S = math.ceil(max_model_len / self.P) * self.P
        cfg, cache = runner.cfg, runner.cache
        kv_row_bytes = self.S * cfg.n_kv_head * cfg.head_dim * cache.k_SGDh[0].element_size()
        self.sizes = [b for b in BATCH_SIZES if b <= max(max_num_seqs, 1) and b * kv_row_bytes <= MAX_GATHER_BYTES]
        self.static: dict[tuple[int, int], _Static] = {}
        self.eager_reason: dict[tuple[int, int], str] = {}  # (B, Q) shapes that run eagerly, and why
        self.pool = None
        self.replays = 0

    # ---- which steps ------------------------------------------------------------------------------
    def batch_size(self, R: int) -> int | None:
        i = bisect.bisect_left(self.sizes, R)
        return self.sizes[i] if i < len(self.sizes) else None

    def shape(self, items: list[RunItem]) -> tuple[int, int] | None:
        """(B, Q) for these items, or None when they are not all decode/verification items."""
        if not all(1 <= len(it.token_ids) <= SHORT_QUERY and it.num_logits == len(it.token_ids)
                   and not it.prompt_targets for it in items):
            return None
        B = self.batch_size(len(items))
        return None if B is None else (B, max(len(it.token_ids) for it in items))

    def can_run(self, items: list[RunItem]) -> bool:
        key = self.shape(items)
        if key is None or key in self.eager_reason:
            return False
        reason = self._uncapturable(key[0] * key[1])
        if reason is not None:
            self.eager_reason[key] = reason
            return False
        return True

    def _uncapturable(self, T: int) -> str | None:
        dispatch, dtype = moe_dispatch(self.runner.device, T), self.runner.model.tok_emb.weight.dtype
        for m in self.runner.model.moe_layers():
            if m.capacity_factor > 0:
                return "capacity dropping: padded tokens would take real tokens' places"
            if self.capture and not m.experts.capturable(dispatch, dtype):
                return f"the {dispatch} expert path of {type(m.experts).__name__} syncs with the host here"
        return None

    # ---- one step ---------------------------------------------------------------------------------
    def run(self, items: list[RunItem]) -> RunOutput:
        key = self.shape(items)
        B, Q = key
        st = self._static_for(key)
        if st is None:  # its capture just failed: this step, and every later one of this shape, runs eagerly
            return self.runner.forward(items)
        st.packed.copy_(self._inputs(items, B, Q))
        if st.graph is not None:
            st.graph.replay()
            self.replays += 1
        else:
            self._forward(st)
        rows = [r * Q + i for r, it in enumerate(items) for i in range(len(it.token_ids))]
        logits_RV = st.logits_TV.index_select(0, torch.tensor(rows, device=st.logits_TV.device))
        return RunOutput(logits_RV, st.counts_LE.cpu() if st.counts_LE is not None else None)

    def capture_all(self, queries: tuple[int, ...] = (1,)) -> int:
        """Capture every batch size for each query count now, largest first (vLLM captures at start-up, so
        that no request waits for a capture). Returns how many graphs were built."""
        built = 0
        for Q in queries:
            for B in reversed(self.sizes):
                key = (B, Q)
                if key in self.static or key in self.eager_reason:
                    continue
                reason = self._uncapturable(B * Q)
                if reason is not None:
                    self.eager_reason[key] = reason
                    continue
                built += self._static_for(key) is not None
        return built

    def _static_for(self, key: tuple[int, int]) -> _Static | None:
        """The buffers and graph of shape `key`, built at first use; None if its capture failed."""
        st = self.static.get(key)
        if st is None and key not in self.eager_reason:
            try:
                st = self.static[key] = self._build(*key)
            except RuntimeError as e:  # a path _uncapturable did not foresee: run this shape eagerly from now on
                torch.cuda.synchronize(self.runner.device)
                self.eager_reason[key] = f"capture failed: {str(e).splitlines()[0][:200]}"
                print(f"moekit: decode shape {key} runs eagerly ({self.eager_reason[key]})", file=sys.stderr)
        return st

    def _inputs(self, items: list[RunItem], B: int, Q: int) -> torch.Tensor:
        """The packed int64 inputs on the host (plain lists, then two tensors: this runs every step). A
        padding row is token 0 at position 0, writing to and seeing only the scratch slot; a real row's
        padded queries write to scratch and see the row's context."""
        P, scratch, NB = self.P, self.runner.cache.scratch_slot, self.S // self.P
        tokens, positions, slots, real, tables = [], [], [], [], []
        for it in items:
            n, s0, table = len(it.token_ids), it.start, it.block_ids
            pad = Q - n
            tokens += it.token_ids + [0] * pad
            positions += [*range(s0, s0 + n)] + [s0] * pad
            slots += [table[p // P] * P + p % P for p in range(s0, s0 + n)] + [scratch] * pad
            real += [1] * n + [0] * pad
            tables.append(table + [-1] * (NB - len(table)))
        pad_tokens = (B - len(items)) * Q
        tokens += [0] * pad_tokens
        positions += [0] * pad_tokens
        slots += [scratch] * pad_tokens
        real += [0] * pad_tokens
        tables += [[-1] * NB] * (B - len(items))
        # Row 3 is the last position a query may see: its own (padding: its row's start, or 0).
        head_5T = torch.tensor([tokens, positions, slots, positions, real], dtype=torch.long)
        tables_BN1 = torch.tensor(tables, dtype=torch.long)[:, :, None]
        kv_slots_BS = torch.where(tables_BN1 >= 0, tables_BN1 * P + torch.arange(P), scratch).reshape(B, -1)
        return torch.cat([head_5T.reshape(-1), kv_slots_BS.reshape(-1)])

    def _build(self, B: int, Q: int) -> _Static:
        dev, T = self.runner.device, B * Q
        packed = torch.zeros(5 * T + B * self.S, dtype=torch.long, device=dev)
        h = packed[:5 * T].view(5, T)
        st = _Static(packed, h[0], h[1], h[2], h[3], h[4], packed[5 * T:].view(B, self.S))
        st.packed.copy_(self._inputs([], B, Q))  # all padding: a safe input for the warm-up and capture
        if not self.capture:
            return st
        # Warm up on a side stream first (lazy cuBLAS/cuDNN initialisation must not be captured), then
        # capture into the shared pool (torch.cuda.graphs docs, "Whole-network capture").
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.inference_mode():
            self._forward(st)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            self._forward(st)
        self.pool = graph.pool()
        st.graph = graph
        return st

    @torch.inference_mode()
    def _forward(self, st: _Static) -> None:
        """The model's forward on the static buffers (the runner's call, one attention group of B x Q
        queries over S slots each); writes st.logits_TV and st.counts_LE."""
        runner, (B, S), T = self.runner, st.kv_slots_BS.shape, st.tokens_T.shape[0]
        Q, dev = T // B, runner.device
        rows_T = torch.arange(T, device=dev)
        group = AttentionGroup(rows_T.view(B, Q), st.kv_slots_BS, causal_mask(st.sees_T.view(B, Q), S)[:, None],
                               rows_T, None)
        with dispatch_for(runner.model, moe_dispatch(dev, T)):
            out = runner.model(st.tokens_T[None], ctx=runner.context(st.slots_T, [group]),
                               positions_BT=st.positions_T[None], logits_rows=rows_T)
        st.logits_TV = out.logits.float()
        if out.routing:
            E = runner.cfg.n_expert
            experts_NK = torch.cat([r.experts_TK for r in out.routing])  # N = L x T rows
            hits_NE = torch.zeros(experts_NK.shape[0], E, dtype=torch.long, device=dev)
            hits_LTE = hits_NE.scatter_(1, experts_NK, 1).view(len(out.routing), T, E)  # (no one_hot: no sync)
            st.counts_LE = (hits_LTE * st.real_T[None, :, None]).sum(1)
