"""The model runner: one forward pass over a ragged batch that reads and writes the paged KV cache.

A batch is a list of `RunItem`s (batch.py), one per request: a prefill chunk, one decode token, or a
decode token followed by speculative draft tokens. All their tokens are flattened into one sequence
of T tokens, so every matmul (projections, experts, lm_head) runs once for the whole batch; only
attention is per request. The runner does not compute anything itself: it builds the step's
`PagedContext` (the slot each new token's K/V goes to, and the attention groups) and calls the
model's own `forward`, the same one training runs (moekit/model/attention.py writes the K/V, then
reads the cache).

Attention gathers each request's blocks and runs SDPA with the causal mask of its positions:
short queries (decode, speculative verification) are padded and batched into one SDPA call, long
ones (prefill chunks) run one request at a time.

MoE layers route the T tokens with the model's own dispatch paths, both of which read only the
experts the batch routes to; the runner picks one per batch. "sorted" runs each used expert once
on its tokens, in place; "gather" copies the routed experts' weights per token and runs one batched
matmul with no host sync. On a CPU "sorted" wins even for a single token (1.0 vs 3.5 ms for a
gpt4-mini layer, and 10x at 4-5 tokens, where a speculative verification sits); on a GPU "gather"
is kept for one or two tokens, where the sorted path's host sync costs more than the copy.
Tokens per expert per layer are counted from `RoutingInfo` every step.

On a GPU the engine replays steps made only of decode tokens and speculative verifications as CUDA
graphs of this same model call, padded to a fixed shape (cuda_graphs.py), unless enforce_eager.

Shape legend: T tokens in the batch, R requests in an attention group, Q queries per request
(padded), S attended slots (padded), H query heads, G KV heads, Dh head_dim, D d_model,
V vocabulary, E experts, L MoE layers.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from moekit.infer.batch import RunItem, RunOutput
from moekit.infer.encoder_cache import KV, image_of
from moekit.infer.kv_cache import PagedKVCache
from moekit.model.attention import AttentionGroup, PagedContext, causal_mask
from moekit.model.transformer import Transformer
from moekit.model.vision import VisionInput

SHORT_QUERY = 8  # queries up to this long are padded and batched in one SDPA call
GATHER_MAX_TOKENS = 2  # on a GPU, batches up to this many tokens use the MoE's gather dispatch


def moe_dispatch(device: torch.device, T: int) -> str:
    """The MoE dispatch path for a batch of T tokens on `device` (see the module docstring)."""
    return "gather" if device.type == "cuda" and T <= GATHER_MAX_TOKENS else "sorted"


@contextmanager
def dispatch_for(model: Transformer, dispatch: str):
    """Set every MoE layer's dispatch path for one forward pass."""
    moes = model.moe_layers()
    saved = [m.dispatch for m in moes]
    for m in moes:
        m.dispatch = dispatch
    try:
        yield dispatch
    finally:
        for m, d in zip(moes, saved, strict=True):
            m.dispatch = d


class ModelRunner:
    def __init__(self, model: Transformer, cache: PagedKVCache):
        self.model, self.cache = model, cache
        self.cfg = model.cfg
        self.block_size = cache.block_size
        self.device = next(model.parameters()).device  # (a pipeline stage after the first has no embedding)

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
                mask = causal_mask(it.start + torch.arange(n), ctx)[None, None]
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
            mask_RQS = causal_mask(start_R[:, None] + q_RQ, kv_slots_RS.shape[1])
            valid_RQ = torch.arange(Q)[None, :] < n_R[:, None]
            groups.append(AttentionGroup(q_rows_RQ.to(dev), kv_slots_RS.to(dev), mask_RQS[:, None].to(dev),
                                         q_rows_RQ[valid_RQ].to(dev), valid_RQ.to(dev)))
        return groups

    def context(self, slots_T: torch.Tensor, groups: list[AttentionGroup]) -> PagedContext:
        """The attention context of one step over this runner's cache."""
        return PagedContext(self.cache.k_SGDh, self.cache.v_SGDh, slots_T, groups)

    def prepare(self, items: list[RunItem]) -> tuple[torch.Tensor, torch.Tensor, PagedContext, torch.Tensor]:
        """The model call's inputs for one step: token ids (1, T), positions (1, T), the paged context, logit rows."""
        if not items:
            raise ValueError("forward needs at least one item")
        dev = self.device
        offsets, tokens, positions, slots, logit_rows, prompt_rows = [], [], [], [], [], []
        for it in items:
            n = len(it.token_ids)
            if n < 1 or not 0 <= it.num_logits <= n or len(it.prompt_targets) > n:
                raise ValueError(f"bad RunItem: {n} tokens, {it.num_logits} logits, "
                                 f"{len(it.prompt_targets)} prompt targets")
            offsets.append(len(tokens))
            prompt_rows += range(len(tokens), len(tokens) + len(it.prompt_targets))
            tokens += it.token_ids
            positions += range(it.start, it.start + n)
            slots += self._slots(it, range(it.start, it.start + n))
            logit_rows += range(len(tokens) - it.num_logits, len(tokens))
        logit_rows += prompt_rows
        ctx = self.context(torch.tensor(slots, device=dev), self._groups(items, offsets))
        return (torch.tensor(tokens, device=dev)[None], torch.tensor(positions, device=dev)[None], ctx,
                torch.tensor(logit_rows, dtype=torch.long, device=dev))

    def vision(self, items: list[RunItem], encoder_kv: list[KV | None]) -> VisionInput | None:
        """The step's cross-attention input: the K/V of every image of the batch's requests, concatenated
        (a bank of I images), and for each token the bank index of its image (Flamingo's masking: the last
        marker at or before the token's position in its request), -1 for tokens that see no image."""
        image_T, banks, n_images = [], [], 0
        for it, kv in zip(items, encoder_kv, strict=True):
            for p in range(it.start, it.start + len(it.token_ids)):
                j = image_of(it.image_positions, p)
                image_T.append(n_images + j if j >= 0 else -1)
            if kv is not None and it.image_positions:
                banks.append(kv)
                n_images += len(it.image_positions)
        if not banks or max(image_T) < 0:
            return None
        kv = {layer: (torch.cat([b[layer][0] for b in banks]), torch.cat([b[layer][1] for b in banks]))
              for layer in banks[0]}
        return VisionInput(torch.tensor(image_T, device=self.device)[None], kv=kv)

    @torch.inference_mode()
    def forward(self, items: list[RunItem], inputs: torch.Tensor | None = None,
                encoder_kv: list[KV | None] | None = None):
        """One step's forward pass: a RunOutput, or for a pipeline stage before the last (moekit/parallel/
        worker.py) its hidden states. `inputs` replaces the token ids with the previous stage's hidden
        states (1, T, D). encoder_kv: per item, its request's images' cross-attention K/V (None: no images)."""
        tokens_1T, positions_1T, ctx, logit_rows = self.prepare(items)
        vision = self.vision(items, encoder_kv) if encoder_kv is not None else None
        with dispatch_for(self.model, moe_dispatch(self.device, tokens_1T.shape[1])):
            out = self.model(tokens_1T if inputs is None else inputs, ctx=ctx, positions_BT=positions_1T,
                             logits_rows=logit_rows, vision=vision)
        if isinstance(out, torch.Tensor):
            return out
        counts = [r.tokens_per_expert_E for r in out.routing]
        return RunOutput(out.logits.float(), torch.stack(counts).cpu() if counts else None)
