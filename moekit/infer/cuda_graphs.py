"""CUDA graphs for decode steps: one graph launch per step instead of hundreds of kernel launches.

Why: a gpt4-mini decode step is ~600 small kernels (8 layers of norms, projections, RoPE, cache
writes, attention, router, experts). Launched one by one from Python on an H200 they took ~20 ms per
step, so batch-1 decode ran at 49 tokens/s against a 41,000 tokens/s bandwidth roofline
(bench/decode.py, November 2026): bound by the CPU, not by the GPU. vLLM captures the decode forward
once per batch size and replays it (vllm/v1/worker/gpu_model_runner.py, `capture_model`); gpt-fast
gets the same from `torch.compile(mode="reduce-overhead")`. This is the vLLM way, without a compiler.

How: a step whose items are all single decode tokens (R requests) is padded to the next captured
batch size B (`BATCH_SIZES`). The graph reads static input buffers that each step fills with one
host-to-device copy: token ids, positions, the cache slot each new token writes, each request's
context length, and its block table as (B, S) cache slots, S covering max_model_len. Padding rows
write their K/V to the cache's scratch slot (`PagedKVCache.scratch_slot`) and attend to it alone, so
they touch no request's blocks; the mask hides every slot past a request's context. Shapes must be
static, so attention runs over S masked slots rather than over the context: the price of one graph
for every context length (vLLM's paged-attention kernel reads only the context; masked SDPA over a
gathered table is the portable stand-in). Graphs are captured lazily, at the first step of each
size, and share one memory pool (replays never overlap).

What cannot be captured runs eagerly: MoE layers with capacity dropping (padded tokens would compete
for capacity with real ones), and expert paths that sync with the host to size their slices (the
sorted path in fp32 or int8 above GATHER_MAX_TOKENS tokens; bf16 uses torch's grouped GEMM, which
takes its offsets on the device). Tokens per expert are counted for the R real tokens from router
logits the graph keeps, not from the padded batch.

Shape legend: B padded batch, R real requests, S attended slots, L MoE layers, E experts, V vocabulary.
"""

from __future__ import annotations

import bisect
import math
import sys
from dataclasses import dataclass

import torch

from moekit.infer.runner import GATHER_MAX_TOKENS, ModelRunner, RunItem, RunOutput, _Group
from moekit.model.attention import rope_cos_sin
from moekit.model.grouped import use_grouped_mm
from moekit.model.moe import MoE, route

BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)  # vLLM's capture sizes, to 256
MAX_GATHER_BYTES = 512 << 20  # skip graphs whose (B, S) K/V gather would pass this per layer


@dataclass
class _Static:
    """One captured batch size: its input buffers (views of one packed int64 tensor), outputs, graph."""

    packed: torch.Tensor  # B x (4 + S) int64 on the device: filled by one copy per step
    tokens_B: torch.Tensor
    positions_B: torch.Tensor
    slots_B: torch.Tensor
    ctx_B: torch.Tensor
    kv_slots_BS: torch.Tensor
    logits_BV: torch.Tensor | None = None
    hits_LBE: torch.Tensor | None = None  # 1 where layer l routes row b to expert e
    graph: torch.cuda.CUDAGraph | None = None


class DecodeGraphs:
    """Decode steps of a `ModelRunner` as replayed CUDA graphs. With `capture=False` the same padded,
    static-shape forward runs eagerly: tests check it on a CPU against the runner's ragged forward."""

    def __init__(self, runner: ModelRunner, max_model_len: int, max_num_seqs: int, capture: bool = True):
        self.runner, self.capture = runner, capture
        self.P = runner.block_size
        self.S = math.ceil(max_model_len / self.P) * self.P
        cfg, cache = runner.cfg, runner.cache
        kv_row_bytes = self.S * cfg.n_kv_head * cfg.head_dim * cache.k_SGDh[0].element_size()
        self.sizes = [b for b in BATCH_SIZES if b <= max(max_num_seqs, 1) and b * kv_row_bytes <= MAX_GATHER_BYTES]
        self.static: dict[int, _Static] = {}
        self.eager_reason: dict[int, str] = {}  # batch sizes that run eagerly, and why
        self.pool = None
        self.replays = 0

    # ---- which steps ------------------------------------------------------------------------------
    def batch_size(self, R: int) -> int | None:
        i = bisect.bisect_left(self.sizes, R)
        return self.sizes[i] if i < len(self.sizes) else None

    def can_run(self, items: list[RunItem]) -> bool:
        if not all(len(it.token_ids) == 1 and it.num_logits == 1 for it in items):
            return False
        B = self.batch_size(len(items))
        if B is None or B in self.eager_reason:
            return False
        reason = self._uncapturable(B)
        if reason is not None:
            self.eager_reason[B] = reason
            return False
        return True

    def _uncapturable(self, B: int) -> str | None:
        for m in self.runner.model.moe_layers():
            if m.capacity_factor > 0:
                return "capacity dropping: padded tokens would take real tokens' places"
            if B > GATHER_MAX_TOKENS and self.capture:
                probe = m.w1 if isinstance(getattr(m, "w1", None), torch.Tensor) else None
                if type(m)._sorted is not MoE._sorted or probe is None or not use_grouped_mm(probe):
                    return "the sorted expert path syncs with the host here (only bf16 grouped GEMM does not)"
        return None

    # ---- one step ---------------------------------------------------------------------------------
    def run(self, items: list[RunItem]) -> RunOutput:
        R, B = len(items), self.batch_size(len(items))
        st = self.static.get(B)
        if st is None:
            try:
                st = self._build(B)
            except RuntimeError as e:  # a path _uncapturable did not foresee: run this size eagerly from now on
                torch.cuda.synchronize(self.runner.device)
                self.eager_reason[B] = f"capture failed: {str(e).splitlines()[0][:200]}"
                print(f"moekit: decode batch size {B} runs eagerly ({self.eager_reason[B]})", file=sys.stderr)
                return self.runner.forward(items)
            self.static[B] = st
        st.packed.copy_(self._inputs(items, B))
        if st.graph is not None:
            st.graph.replay()
            self.replays += 1
        else:
            self._forward(st)
        counts_LE = st.hits_LBE[:, :R].sum(1).cpu() if st.hits_LBE is not None else None
        return RunOutput(st.logits_BV[:R].clone(), counts_LE)

    def _inputs(self, items: list[RunItem], B: int) -> torch.Tensor:
        """The packed int64 inputs on the host: padding rows are token 0 at position 0, writing to and
        reading from the scratch slot, with a context of 1."""
        P, S, scratch = self.P, self.S, self.runner.cache.scratch_slot
        tokens, positions, slots, ctx = [0] * B, [0] * B, [scratch] * B, [1] * B
        kv_slots_BS = torch.full((B, S), scratch, dtype=torch.long)
        for r, it in enumerate(items):
            tokens[r], positions[r], ctx[r] = it.token_ids[0], it.start, it.start + 1
            slots[r] = it.block_ids[it.start // P] * P + it.start % P
            table = torch.tensor(it.block_ids, dtype=torch.long)
            kv_slots_BS[r, :len(it.block_ids) * P] = (table[:, None] * P + torch.arange(P)).reshape(-1)
        head = torch.tensor([tokens, positions, slots, ctx], dtype=torch.long).reshape(-1)
        return torch.cat([head, kv_slots_BS.reshape(-1)])

    def _build(self, B: int) -> _Static:
        dev = self.runner.device
        packed = torch.zeros(B * (4 + self.S), dtype=torch.long, device=dev)
        head_4B = packed[:4 * B].view(4, B)
        st = _Static(packed, head_4B[0], head_4B[1], head_4B[2], head_4B[3], packed[4 * B:].view(B, self.S))
        st.packed.copy_(self._inputs([], B))  # all padding: a safe input for the warm-up and capture
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
        """The runner's layers on the static buffers; writes st.logits_BV and st.hits_LBE."""
        runner, B, S = self.runner, st.tokens_B.shape[0], self.S
        dev = runner.device
        cos, sin = rope_cos_sin(runner.model.inv_freq, st.positions_B[None])
        rows_B = torch.arange(B, device=dev)
        visible_B11S = (torch.arange(S, device=dev)[None, :] < st.ctx_B[:, None])[:, None, None, :]
        group = _Group(rows_B[:, None], st.kv_slots_BS, visible_B11S, rows_B, None)
        with runner.dispatch_for(B):
            logits_BV, _, router = runner._layers(st.tokens_B, st.slots_B, cos, sin, [group], rows_B,
                                                  keep_router_logits=True)
        st.logits_BV = logits_BV
        if router:
            E, K = router[0].shape[-1], runner.cfg.top_k
            _, _, experts_NK = route(torch.stack(router).reshape(-1, E), K)  # N = L x B rows
            hits_NE = torch.zeros(experts_NK.shape[0], E, dtype=torch.long, device=dev)
            st.hits_LBE = hits_NE.scatter_(1, experts_NK, 1).view(len(router), B, E)  # (no one_hot: no sync)
