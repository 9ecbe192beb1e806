"""The model runner: one forward pass over a ragged batch that reads and writes the paged KV cache.

A batch is a list of `RunItem`s, one per request: a prefill chunk, one decode token, or a decode
token followed by speculative draft tokens. All their tokens are flattened into one sequence of T
tokens, so every matmul (projections, experts, lm_head) runs once for the whole batch; only
attention is per request. The runner reuses the model's own modules (`block.attn.qkv`,
`block.attn.wo`, the norms, `block.mlp`): there is no second copy of the model.

Per layer, every new token's K/V is written into its cache slot *before* any attention reads the
cache (vLLM: `reshape_and_cache`, then attention), so a request may read blocks that another
request of the same batch is filling (a prefix-cache hit registered in this very step).
Attention gathers each request's blocks and runs SDPA with the causal mask of its positions:
short queries (decode, speculative verification) are padded and batched into one SDPA call, long
ones (prefill chunks) run one request at a time. On a GPU the gather is where a paged-attention
kernel (FlashAttention's `block_table`, vLLM's `paged_attention`) goes.

MoE layers route the T tokens with the model's own dispatch paths, both of which read only the
experts the batch routes to; the runner picks one per batch. "sorted" runs each used expert once
on its tokens, in place; "gather" copies the routed experts' weights per token and runs one batched
matmul with no host sync. On a CPU "sorted" wins even for a single token (1.0 vs 3.5 ms for a
gpt4-mini layer, and 10x at 4-5 tokens, where a speculative verification sits); on a GPU "gather"
is kept for one or two tokens, where the sorted path's host sync costs more than the copy.
Tokens per expert per layer are counted from `RoutingInfo` every step.

On a GPU, steps made only of decode tokens and speculative verifications are padded to a fixed
shape and replayed as CUDA graphs (cuda_graphs.py), unless the runner is built with enforce_eager.

Shape legend: T tokens in the batch, R requests in an attention group, Q queries per request
(padded), S attended slots (padded), H query heads, G KV heads, Dh head_dim, D d_model,
V vocabulary, E experts, L MoE layers.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moekit.infer.kv_cache import PagedKVCache
from moekit.model.attention import rope_cos_sin
from moekit.model.transformer import Transformer

SHORT_QUERY = 8  # queries up to this long are padded and batched in one SDPA call
GATHER_MAX_TOKENS = 2  # on a GPU, batches up to this many tokens use the MoE's gather dispatch


@dataclass
class RunItem:
    token_ids: list[int]  # tokens to compute
    start: int  # position of the first one = tokens of this request already in the cache
    block_ids: list[int]  # the request's block table, covering start + len(token_ids) tokens
    num_logits: int  # logits wanted for the last num_logits tokens (0 for a partial prefill chunk)
    request_id: str = ""  # for logs and tests only


@dataclass
class RunOutput:
    logits_RV: torch.Tensor  # float32, rows in item order, num_logits rows per item
    tokens_per_expert_LE: torch.Tensor | None  # int64 on the CPU; None for a dense model


@dataclass
class AttentionGroup:
    """Index tensors of one attention call, built once per step and reused by every layer."""

    q_rows_RQ: torch.Tensor  # row of each query in the flat batch (padding repeats a real row)
    kv_slots_RS: torch.Tensor  # cache slot of each attended token (padding points at slot 0)
    mask_R1QS: torch.Tensor | None  # True = may attend; None = plain causal (a fresh prefill)
    out_rows: torch.Tensor  # rows of the flat batch that receive this group's real queries
    out_valid_RQ: torch.Tensor | None  # which (r, q) are real queries (None: all, in row order)


class ModelRunner:
    def __init__(self, model: Transformer, cache: PagedKVCache, max_model_len: int | None = None,
                 max_num_seqs: int = 256, enforce_eager: bool = False):
        self.model, self.cache = model, cache
        self.cfg = model.cfg
        self.block_size = cache.block_size
        self.device = model.tok_emb.weight.device
        self.graphs = None  # decode steps replay CUDA graphs on a GPU (cuda_graphs.py), unless enforce_eager
        if self.device.type == "cuda" and not enforce_eager:
            from moekit.infer.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self, max_model_len or self.cfg.max_seq_len, max_num_seqs)

    def _slots(self, item: RunItem, positions: range) -> list[int]:
        P, table = self.block_size, item.block_ids
        return [table[p // P] * P + p % P for p in positions]

    def _table_slots(self, tables: list[list[int]]) -> torch.Tensor:
        """(R, S) cache slots of the first S = max blocks x P tokens of each request (padding: block 0)."""
        nb = max(len(t) for t in tables)
        tables_RB = torch.tensor([t + [0] * (nb - len(t)) for t in tables], dtype=torch.long)
        return (tables_RB[:, :, None] * self.block_size + torch.arange(self.block_size)).reshape(len(tables), -1)

    def _groups(self, items: list[RunItem], offsets: list[int]) -> list[AttentionGroup]:
        dev, groups = self.device, []
        short = [i for i, it in enumerate(items) if len(it.token_ids) <= SHORT_QUERY]
        for i, it in enumerate(items):  # long queries: one SDPA each, no padding
            n = len(it.token_ids)
            if n <= SHORT_QUERY:
                continue
            ctx = it.start + n
            rows = torch.arange(offsets[i], offsets[i] + n)
            slots = self._table_slots([it.block_ids])[:, :ctx]
            mask = None
            if it.start > 0:  # a later chunk: query t sees the cached tokens and new tokens up to t
                mask = (torch.arange(ctx)[None, :] <= it.start + torch.arange(n)[:, None])[None, None]
            groups.append(AttentionGroup(rows[None].to(dev), slots.to(dev),
                                         mask.to(dev) if mask is not None else None, rows.to(dev), None))
        if short:
            n_R = torch.tensor([len(items[i].token_ids) for i in short])
            start_R = torch.tensor([items[i].start for i in short])
            Q = int(n_R.max())
            kv_slots_RS = self._table_slots([items[i].block_ids for i in short])
            q_RQ = torch.minimum(torch.arange(Q)[None, :], (n_R - 1)[:, None])  # padding repeats the last query
            q_rows_RQ = torch.tensor([offsets[i] for i in short])[:, None] + q_RQ
            # Key j is visible to the query at position start + q when j <= start + q (so j < the context).
            mask_RQS = torch.arange(kv_slots_RS.shape[1])[None, None, :] <= (start_R[:, None] + q_RQ)[:, :, None]
            valid_RQ = torch.arange(Q)[None, :] < n_R[:, None]
            groups.append(AttentionGroup(q_rows_RQ.to(dev), kv_slots_RS.to(dev), mask_RQS[:, None].to(dev),
                                         q_rows_RQ[valid_RQ].to(dev), valid_RQ.to(dev)))
        return groups

    @torch.inference_mode()
    def forward(self, items: list[RunItem]) -> RunOutput:
        if not items:
            raise ValueError("forward needs at least one item")
        if self.graphs is not None and self.graphs.can_run(items):  # decode tokens only: replay a graph
            return self.graphs.run(items)
        model, dev = self.model, self.device
        offsets, tokens, positions, slots, logit_rows = [], [], [], [], []
        for it in items:
            n = len(it.token_ids)
            if n < 1 or not 0 <= it.num_logits <= n:
                raise ValueError(f"bad RunItem: {n} tokens, {it.num_logits} logits")
            offsets.append(len(tokens))
            tokens += it.token_ids
            positions += range(it.start, it.start + n)
            slots += self._slots(it, range(it.start, it.start + n))
            logit_rows += range(len(tokens) - it.num_logits, len(tokens))
        tokens_T = torch.tensor(tokens, device=dev)
        slots_T = torch.tensor(slots, device=dev)
        cos, sin = rope_cos_sin(model.inv_freq, torch.tensor(positions, device=dev)[None])
        groups = self._groups(items, offsets)
        with self.dispatch_for(len(tokens)):
            logits_RV, counts, _ = self.layers(tokens_T, slots_T, cos, sin, groups,
                                                torch.tensor(logit_rows, dtype=torch.long, device=dev))
        per_expert = torch.stack(counts).cpu() if counts else None
        return RunOutput(logits_RV, per_expert)

    @contextmanager
    def dispatch_for(self, T: int):
        """Set every MoE layer's dispatch path for a batch of T tokens (see the module docstring)."""
        moes = self.model.moe_layers()
        saved = [m.dispatch for m in moes]
        dispatch = "gather" if self.device.type == "cuda" and T <= GATHER_MAX_TOKENS else "sorted"
        for m in moes:
            m.dispatch = dispatch
        try:
            yield dispatch
        finally:
            for m, d in zip(moes, saved, strict=True):
                m.dispatch = d

    def layers(self, tokens_T, slots_T, cos, sin, groups, logit_rows_R, keep_router_logits: bool = False):
        """The blocks over the flat batch (K/V written, then read), then logits of the wanted rows; per
        MoE layer the tokens per expert and, if asked, the router logits (T, E)."""
        model, T = self.model, tokens_T.shape[0]
        x_1TD = model.tok_emb(tokens_T)[None]
        counts, router_logits = [], []
        for layer, block in enumerate(model.blocks):
            attn = block.attn
            q_1HTDh, k_1GTDh, v_1GTDh = attn.qkv(block.attn_norm(x_1TD), cos, sin)
            k_SGDh, v_SGDh = self.cache.k_SGDh[layer], self.cache.v_SGDh[layer]
            k_SGDh.index_copy_(0, slots_T, k_1GTDh[0].transpose(0, 1).to(k_SGDh.dtype))  # write first...
            v_SGDh.index_copy_(0, slots_T, v_1GTDh[0].transpose(0, 1).to(v_SGDh.dtype))
            q_THDh = q_1HTDh[0].transpose(0, 1)
            o_THDh = torch.empty_like(q_THDh)
            for g in groups:  # ...then read
                q_RHQDh = q_THDh[g.q_rows_RQ].permute(0, 2, 1, 3)
                k_RGSDh = k_SGDh[g.kv_slots_RS].permute(0, 2, 1, 3).to(q_RHQDh.dtype)
                v_RGSDh = v_SGDh[g.kv_slots_RS].permute(0, 2, 1, 3).to(q_RHQDh.dtype)
                o_RHQDh = F.scaled_dot_product_attention(
                    q_RHQDh, k_RGSDh, v_RGSDh, attn_mask=g.mask_R1QS, is_causal=g.mask_R1QS is None,
                    enable_gqa=attn.n_kv_head != attn.n_head)
                o_RQHDh = o_RHQDh.permute(0, 2, 1, 3)
                o_THDh[g.out_rows] = (o_RQHDh[g.out_valid_RQ] if g.out_valid_RQ is not None
                                      else o_RQHDh.reshape(-1, *o_RQHDh.shape[2:]))
            x_1TD = x_1TD + attn.wo(o_THDh.reshape(1, T, -1))
            h_1TD = block.mlp_norm(x_1TD)
            y_1TD, info = block.mlp(h_1TD)
            x_1TD = x_1TD + y_1TD
            if info is not None:
                counts.append(info.tokens_per_expert_E)
                if keep_router_logits:  # the router again: a (T, D) x (D, E) product, next to nothing
                    router_logits.append(block.mlp.router(h_1TD[0]))
        h_RD = x_1TD[0, logit_rows_R]
        return model.lm_head(model.norm(h_RD)).float(), counts, router_logits
