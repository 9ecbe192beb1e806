"""Speculative decoding: a cheap proposer guesses k tokens, the target checks k + 1 positions at once.

SPEC section 4: GPT-4 reportedly lets a small draft model propose ~4 tokens that the big model
verifies in one batch. Decoding is bandwidth-bound, so checking k + 1 positions costs about as
much as computing one; every accepted draft token is a target forward pass saved.

Verification is the rejection sampling of Leviathan et al. 2023 (algorithm 1) and Chen et al.
2023 (algorithm 2): draft token d_i, drawn from the proposer's q_i, is kept with probability
min(1, p_i(d_i) / q_i(d_i)), where p_i is the target's distribution at that position (after the
request's temperature, top-k/p, min-p and penalties); at the first rejection a token is drawn from
the residual norm(max(0, p_i - q_i)) and the rest are dropped; if all k are kept, a bonus token is
drawn from p_{k+1}. Every emitted token is then distributed exactly as p (the papers' theorem 1;
tests/test_infer_spec.py checks it with a chi-square test), and position i is accepted with
probability sum_x min(p_i(x), q_i(x)). Greedy requests keep the draft while it equals the target's
argmax (vLLM), so their output is identical to plain greedy decoding.

Two proposers:
- `DraftProposer`: a smaller moekit model with the same vocabulary. It keeps its own paged KV
  cache (same block size and block count as the target's, no prefix caching): after each step it
  catches up on the newly committed tokens and proposes k tokens autoregressively; on rejection
  its KV is rolled back like the target's.
- `NgramProposer`: prompt lookup decoding (Saxena 2023, vLLM's "ngram"): find the latest earlier
  occurrence of the last n tokens and propose what followed. No model; q is a point mass.

Both set `req.spec_token_ids` (plain data, read by the scheduler) and return the drafts'
distributions q_KV to the engine, which keeps them, with each request's generator, beside the
request: requests hold no tensors.

Shape legend: K draft tokens, V vocabulary, R rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.infer.batch import RunItem
from moekit.infer.grammar import new_bitmask
from moekit.infer.kv_cache import KVCacheManager, PagedKVCache
from moekit.infer.request import Request
from moekit.infer.runner import ModelRunner
from moekit.infer.sampler import Row, choose, draw, target_probs, uniform
from moekit.model.transformer import Transformer


def residual(p_V: torch.Tensor, q_V: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)): the law of the token emitted at a rejection (Leviathan et al. 2023, eq. 1)."""
    r_V = (p_V - q_V).clamp_min(0)
    total = r_V.sum()
    return r_V / total if total > 0 else p_V  # p == q up to rounding: a rejection had probability ~0


def verify(p_RV: torch.Tensor, draft: list[int], q_KV: torch.Tensor | None, generator: torch.Generator | None,
           greedy: bool) -> list[int]:
    """The tokens emitted for one request: the accepted drafts, then one drawn or bonus token.

    p_RV: the target's sampling distribution at the K + 1 positions; q_KV: the proposer's
    distribution of each draft token (None = a point mass on it, as the n-gram proposer gives).
    """
    out: list[int] = []
    if greedy:
        target = p_RV.argmax(-1).tolist()
        for i, d in enumerate(draft):
            if d != target[i]:
                return out + [target[i]]
            out.append(d)
        return out + [target[len(draft)]]
    for i, d in enumerate(draft):
        p_d = float(p_RV[i, d])
        q_d = float(q_KV[i, d]) if q_KV is not None else 1.0
        if uniform(generator) * q_d < p_d:  # u < p/q without dividing (q_d > 0: d was drawn from q)
            out.append(d)
            continue
        if q_KV is not None:
            q_V = q_KV[i]
        else:
            q_V = torch.zeros_like(p_RV[i])
            q_V[d] = 1.0
        return out + [draw(residual(p_RV[i], q_V), generator)]
    return out + [draw(p_RV[len(draft)], generator)]


class NgramProposer:
    def __init__(self, num_spec_tokens: int = 4, n_max: int = 3, n_min: int = 1):
        if not 1 <= n_min <= n_max:
            raise ValueError(f"n-gram sizes must satisfy 1 <= n_min <= n_max, got {n_min}, {n_max}")
        self.k, self.n_max, self.n_min = num_spec_tokens, n_max, n_min

    def propose(self, reqs: list[Request], ks: list[int],
                generators: list[torch.Generator | None]) -> list[torch.Tensor | None]:
        """Set `spec_token_ids` of each request (up to k tokens); q is a point mass on each: all None."""
        for req, k in zip(reqs, ks, strict=True):
            req.spec_token_ids = self._lookup(req.all_token_ids, k)
        return [None] * len(reqs)

    def _lookup(self, tokens: list[int], k: int) -> list[int]:
        L = len(tokens)
        for n in range(min(self.n_max, L - 1), self.n_min - 1, -1):
            tail = tokens[L - n:]
            for start in range(L - n - 1, -1, -1):  # the latest earlier occurrence
                if tokens[start:start + n] == tail:
                    return tokens[start + n:start + n + k]
        return []

    def rollback(self, req: Request) -> None:
        pass

    def free(self, req: Request) -> None:
        pass


@dataclass
class _DraftState:  # what the draft's KVCacheManager sees of a request
    request_id: str
    all_token_ids: list[int]
    num_computed_tokens: int = 0


class DraftProposer:
    def __init__(self, draft: Transformer, num_blocks: int, block_size: int, num_spec_tokens: int = 4):
        self.k = num_spec_tokens
        p = draft.tok_emb.weight
        self.kv = KVCacheManager(num_blocks, block_size, enable_caching=False)
        self.cache = PagedKVCache(draft.cfg, num_blocks, block_size, p.dtype, p.device)
        self.runner = ModelRunner(draft, self.cache)
        self.states: dict[str, _DraftState] = {}

    def propose(self, reqs: list[Request], ks: list[int],
                generators: list[torch.Generator | None]) -> list[torch.Tensor | None]:
        """Set `spec_token_ids` of each request to k tokens drawn from the draft (with the request's own
        generator); the draft's distribution q_KV of each request's drafts, None for greedy ones (verify
        compares them with the argmax) and ones left without drafts."""
        q_probs: list[torch.Tensor | None] = [None] * len(reqs)
        live, items, advanced = [], [], []
        for i, (req, k, gen) in enumerate(zip(reqs, ks, generators, strict=True)):
            req.spec_token_ids = []
            st = self.states.setdefault(req.request_id, _DraftState(req.request_id, req.all_token_ids))
            st.all_token_ids = req.all_token_ids
            new = req.num_tokens - st.num_computed_tokens  # committed tokens the draft has not seen
            # K/V for the catch-up tokens and the first k - 1 drafts (the k-th is never fed back).
            if k < 1 or not self.kv.allocate_slots(st, new + k - 1):
                continue  # no room in the draft's pool: this request decodes without drafts this step
            items.append(RunItem(req.all_token_ids[st.num_computed_tokens:], st.num_computed_tokens,
                                 self.kv.block_ids(req.request_id), 1))
            st.num_computed_tokens = req.num_tokens
            live.append((i, req, gen, k, st, []))
        while live:
            logits_RV = self.runner.forward(items).logits_RV
            # The draft samples with the request's own parameters and penalties (its drafts so far count
            # as output), so that a draft equal to the target would always be accepted.
            # A structured-output request drafts under its grammar too (the matcher steps through its drafts and
            # is rolled back below), or nearly every draft would be refused; q stays the law the draft drew from.
            rows = [Row(req.params, gen, req.prompt_token_ids,
                        req.output_token_ids + req.spec_token_ids if req.params.has_penalties else [],
                        req.grammar is not None)
                    for _, req, gen, *_ in live]
            bitmask_RW = None
            if any(r.masked for r in rows):
                bitmask_RW = new_bitmask(len(rows), logits_RV.shape[-1])
                for r, (_, req, *_) in enumerate(live):
                    if req.grammar is not None:
                        req.grammar.fill(bitmask_RW, r)
            q_RV = target_probs(logits_RV, rows, bitmask_RW)
            items, still = [], []
            for r, ((i, req, gen, k, st, qs), d) in enumerate(zip(live, choose(q_RV, rows), strict=True)):
                req.spec_token_ids.append(d)
                qs.append(q_RV[r])
                more = True
                if req.grammar is not None:  # a draft that ends the grammar ends the drafting
                    more = req.grammar.accept(d)
                    if more:
                        advanced.append(req)
                    more = more and not req.grammar.finished
                if len(req.spec_token_ids) < k and more:
                    items.append(RunItem([d], st.num_computed_tokens, self.kv.block_ids(req.request_id), 1))
                    st.num_computed_tokens += 1
                    still.append((i, req, gen, k, st, qs))
                elif not req.params.greedy:
                    q_probs[i] = torch.stack(qs)
            live = still
        for req in advanced:  # the grammars back to the committed output
            req.grammar.rollback(1)
        return q_probs

    def rollback(self, req: Request) -> None:
        """After each step: the draft's K/V past the target's computed tokens holds drafts that were rejected
        (or never checked: the token budget cut them), so it is computed again from there."""
        st = self.states.get(req.request_id)
        if st is not None:
            st.num_computed_tokens = min(st.num_computed_tokens, req.num_computed_tokens)
            self.kv.trim(st, st.num_computed_tokens)

    def free(self, req: Request) -> None:
        st = self.states.pop(req.request_id, None)
        if st is not None:
            self.kv.free(st)

