"""Paged KV cache: a pool of fixed-size blocks, per-request block tables and prefix caching.

The design is vLLM v1's (vllm/v1/core/block_pool.py, kv_cache_manager.py; Kwon et al. 2023,
"PagedAttention"):

- The cache is `num_blocks` blocks of `block_size` tokens; a request's K/V lives in the blocks of
  its block table, in order, so no request needs one contiguous region and nothing is reserved for
  tokens not yet generated. Token `i` of a request sits in slot `table[i // P] * P + i % P`.
- Prefix caching: a *full* block of committed tokens gets a hash chained with its parent block's
  hash (so a block's hash names the whole prefix that ends with it); a new request whose first
  blocks hash the same reuses them instead of computing them again (a shared system prompt is
  computed once). SHA-256, as vLLM's `sha256` option, so that two different prefixes never collide.
- Reference counts: a block is held by every request whose table contains it. At zero it goes to
  the tail of the free queue but keeps its hash and contents: it is still a cache hit until it is
  reallocated. Allocation takes blocks from the head (least recently freed first, LRU eviction);
  a request's blocks are freed last block first, so that the ends of prefixes are evicted before
  their beginnings (vLLM `free`).

The bookkeeping (`BlockPool`, `KVCacheManager`) holds no tensors; `PagedKVCache` holds them.
Shape legend: L layers, N blocks, P tokens per block, S slots (N x P), G KV heads, Dh head_dim.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import torch

from moekit.config import ModelConfig
from moekit.counts import kv_bytes_per_token


class HasTokens(Protocol):  # what the manager needs of a request (scheduler.Request)
    request_id: str
    all_token_ids: list[int]
    num_computed_tokens: int


@dataclass(eq=False, slots=True)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None  # set while the block holds a full, committed, cached block


def hash_block(parent: bytes | None, token_ids: list[int]) -> bytes:
    """SHA-256 of the parent block's hash and this block's token ids: names the whole prefix."""
    return _hash_block_bytes(parent, array("q", token_ids).tobytes())


def _hash_block_bytes(parent: bytes | None, token_bytes: bytes) -> bytes:
    return hashlib.sha256((parent or b"root") + token_bytes).digest()


class BlockPool:
    """All blocks, the free queue (LRU order) and the hash -> block map of cached blocks."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}: raise --kv-cache-gb")
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Insertion order is eviction order: the head is taken first (an OrderedDict gives O(1)
        # removal from the middle, which a cache hit on a free block needs: vLLM's doubly linked list).
        self.free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[bytes, Block] = {}
        self.num_evictions = 0

    @property
    def num_free(self) -> int:  # free blocks, cached or not: all can be allocated
        return len(self.free)

    def allocate(self, n: int) -> list[Block]:
        if n > len(self.free):
            raise RuntimeError(f"asked for {n} blocks with {len(self.free)} free")  # callers check first
        out = []
        for _ in range(n):
            _, block = self.free.popitem(last=False)
            if block.block_hash is not None:  # evict: its contents are about to be overwritten
                del self.cached[block.block_hash]
                block.block_hash = None
                self.num_evictions += 1
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: list[Block]) -> None:
        """Take a reference on cache hits; a free one leaves the free queue (it is in use again)."""
        for b in blocks:
            if b.ref_cnt == 0:
                del self.free[b.block_id]
            b.ref_cnt += 1

    def release(self, blocks_in_eviction_order: list[Block]) -> None:
        for b in blocks_in_eviction_order:
            b.ref_cnt -= 1
            assert b.ref_cnt >= 0, f"block {b.block_id} released more often than taken"
            if b.ref_cnt == 0:
                self.free[b.block_id] = b  # the tail: evicted after every block freed before it

    def cache(self, block: Block, block_hash: bytes) -> None:
        # Two requests that computed the same prefix in the same step hold equal blocks; the first one
        # registered stays the cached copy, the other is an ordinary block (vLLM keeps both).
        if block.block_hash is None and block_hash not in self.cached:
            block.block_hash = block_hash
            self.cached[block_hash] = block

    def lookup(self, block_hash: bytes) -> Block | None:
        return self.cached.get(block_hash)


class KVCacheManager:
    """Block tables of requests over a BlockPool, with prefix caching (vLLM v1 KVCacheManager)."""

    def __init__(self, num_blocks: int, block_size: int = 16, enable_caching: bool = True):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks)
        self.tables: dict[str, list[Block]] = {}
        self.hashes: dict[str, list[bytes]] = {}  # chained hashes of the request's full blocks
        self.num_cached: dict[str, int] = {}  # how many of its leading blocks are registered
        # Per request: while num_computed_tokens + num_new_tokens <= horizon, allocate_slots (without cache hits)
        # has nothing to do: the table covers those tokens and no block of them fills up. A decode step crosses it
        # twice in block_size steps; the scheduler reads it to pass the other steps over without a call (a
        # simulated GPT-4 fleet hour is ~10^8 request-steps). Kept by every method that changes a table or
        # num_cached (tests/test_infer_scheduler_fast_paths.py: up to it, allocate_slots changes nothing).
        self.horizon: dict[str, int] = {}
        self.queries = 0  # prompt tokens looked up in the prefix cache
        self.hits = 0  # of which found

    @property
    def num_blocks(self) -> int:
        return len(self.pool.blocks)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.tables.get(request_id, [])]

    def _block_hashes(self, req: HasTokens) -> list[bytes]:
        hashes = self.hashes.setdefault(req.request_id, [])
        P, tokens = self.block_size, req.all_token_ids
        start, n_full = len(hashes), len(tokens) // P  # tokens only grow: earlier hashes stay valid
        if n_full > start:
            # hash_block for each new full block, the token ids turned into bytes in one go (a prompt's blocks)
            data = array("q", tokens[start * P:n_full * P]).tobytes()
            parent = hashes[-1] if hashes else getattr(req, "cache_salt", None)  # images: chained from their hash
            width = 8 * P
            for j in range(0, len(data), width):
                parent = _hash_block_bytes(parent, data[j:j + width])
                hashes.append(parent)
        return hashes

    def get_computed_blocks(self, req: HasTokens) -> tuple[list[Block], int]:
        """The longest run of leading full blocks already in the cache, and the tokens they hold.

        At least the last token is left to compute: its logits give the next token.
        """
        if not self.enable_caching:
            return [], 0
        hashes = self._block_hashes(req)
        max_blocks = (len(req.all_token_ids) - 1) // self.block_size
        hits = []
        for h in hashes[:max_blocks]:
            block = self.pool.lookup(h)
            if block is None:
                break
            hits.append(block)
        self.queries += len(req.all_token_ids)
        self.hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def can_allocate(self, req: HasTokens, num_new_tokens: int, computed: list[Block] = ()) -> bool:
        return self._blocks_needed(req, num_new_tokens, computed) <= self.pool.num_free - sum(
            b.ref_cnt == 0 for b in computed)

    def _blocks_needed(self, req: HasTokens, num_new_tokens: int, computed: list[Block]) -> int:
        held = len(self.tables.get(req.request_id, [])) + len(computed)
        num_computed = req.num_computed_tokens + len(computed) * self.block_size
        return max(0, math.ceil((num_computed + num_new_tokens) / self.block_size) - held)

    def allocate_slots(self, req: HasTokens, num_new_tokens: int, computed: list[Block] = ()) -> bool:
        """Make the request's table cover its computed tokens, `computed` cache hits and `num_new_tokens`.

        False, with nothing changed, when the pool lacks the blocks (the scheduler then preempts).
        Cache hits on free blocks count against the free blocks: taking them removes them from the queue.
        """
        table = self.tables.get(req.request_id)
        end = req.num_computed_tokens + num_new_tokens
        if not computed and table is not None and end <= len(table) * self.block_size:
            # A decode step inside its last block (15 steps in 16): nothing to take, at most a block to register.
            n_tokens = min(end, len(req.all_token_ids))
            if self.enable_caching and n_tokens // self.block_size > self.num_cached.get(req.request_id, 0):
                self._cache_full_blocks(req, n_tokens)
                self.horizon[req.request_id] = self._horizon(req.request_id)
            return True
        n_new = self._blocks_needed(req, num_new_tokens, computed)
        if n_new > self.pool.num_free - sum(b.ref_cnt == 0 for b in computed):  # can_allocate, n_new counted once
            return False
        if table is None:
            table = self.tables[req.request_id] = []
        if computed:
            self.pool.touch(list(computed))
            table.extend(computed)
            self.num_cached[req.request_id] = len(table)
        table.extend(self.pool.allocate(n_new))
        if self.enable_caching:
            # Register the blocks that will be full of committed tokens once this step has run. Another
            # request may hit them in this same step: the runner writes every token's K/V of a layer
            # before any attention of that layer reads the cache (vLLM's reshape_and_cache, then attention).
            # Draft tokens are never cached: they are not in `all_token_ids` until accepted.
            num_computed = req.num_computed_tokens + len(computed) * self.block_size
            self._cache_full_blocks(req, min(num_computed + num_new_tokens, len(req.all_token_ids)))
        self.horizon[req.request_id] = self._horizon(req.request_id)
        return True

    def _horizon(self, request_id: str) -> int:
        """The tokens up to which allocate_slots(req, n) has nothing to do: those the table covers, and fewer than
        fill the first unregistered block (when one fills, it is registered: a prefix-cache hit for others)."""
        covered = len(self.tables.get(request_id, ())) * self.block_size
        if not self.enable_caching:
            return covered
        return min(covered, (self.num_cached.get(request_id, 0) + 1) * self.block_size - 1)

    def _cache_full_blocks(self, req: HasTokens, num_tokens: int) -> None:
        table = self.tables[req.request_id]
        n_full = num_tokens // self.block_size
        start = self.num_cached.get(req.request_id, 0)
        if n_full <= start:
            return
        hashes = self._block_hashes(req)
        for i in range(start, n_full):
            self.pool.cache(table[i], hashes[i])
        self.num_cached[req.request_id] = n_full

    def trim(self, req: HasTokens, num_tokens: int) -> None:
        """Free the blocks past the first `num_tokens` tokens (speculative rollback).

        Never touches a cached block: those hold only committed tokens, which rollback keeps.
        """
        table = self.tables.get(req.request_id)
        if not table:
            return
        keep = math.ceil(num_tokens / self.block_size)
        if keep < len(table):
            doomed = table[keep:]
            del table[keep:]
            self.pool.release(doomed[::-1])
            self.horizon[req.request_id] = self._horizon(req.request_id)

    def free(self, req: HasTokens) -> None:
        """Release all the request's blocks, last block first (evicted before the prefix it extends)."""
        table = self.tables.pop(req.request_id, [])
        self.pool.release(table[::-1])
        self.hashes.pop(req.request_id, None)
        self.num_cached.pop(req.request_id, None)
        self.horizon.pop(req.request_id, None)

    def check_whole(self) -> None:
        """Raise unless every block is free and unreferenced (tests call it after each run)."""
        held = [b.block_id for b in self.pool.blocks if b.ref_cnt]
        if held or self.tables or self.pool.num_free != self.num_blocks:
            raise AssertionError(f"KV pool not whole: blocks {held[:8]} still referenced, tables of "
                                 f"{list(self.tables)[:4]} alive, {self.pool.num_free}/{self.num_blocks} free")


# ---- the tensors --------------------------------------------------------------------------------
def num_blocks_for(cfg: ModelConfig, kv_cache_gb: float, block_size: int, dtype: torch.dtype) -> int:
    """How many blocks fit in `kv_cache_gb` GiB: 2 (K, V) x layers x KV heads x head_dim x bytes per token."""
    if not kv_cache_gb > 0:
        raise ValueError(f"--kv-cache-gb must be > 0, got {kv_cache_gb}")
    per_block = kv_bytes_per_token(cfg, torch.finfo(dtype).bits // 8) * block_size
    return int(kv_cache_gb * 2**30 // per_block)


class PagedKVCache:
    """Per layer, K and V as flat slot arrays (S, G, Dh): slot = block_id * P + offset.

    K/V are stored per KV head, so multi-query attention (G = 1) stores one head, not n_head. A worker of a
    sharded model (moekit/infer/worker.py) holds only its pipeline stage's `layers` (the others are
    None, so attention still indexes by the global layer number) and its tensor rank's `n_kv_head` (MQA's one
    head is replicated on every tensor rank, as the planner counts it).
    """

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", *, layers: range | None = None, n_kv_head: int | None = None):
        self.block_size, self.num_blocks = block_size, num_blocks
        # One slot past every block: padded rows of a CUDA-graph batch write their K/V there and
        # attend to it alone, so padding never touches a request's blocks (cuda_graphs.py).
        self.scratch_slot = num_blocks * block_size
        G = cfg.n_kv_head if n_kv_head is None else n_kv_head
        owned = set(range(cfg.n_layer) if layers is None else layers)
        shape = (num_blocks * block_size + 1, G, cfg.head_dim)

        def alloc(i):
            return torch.zeros(shape, dtype=dtype, device=device) if i in owned else None

        self.k_SGDh = [alloc(i) for i in range(cfg.n_layer)]
        self.v_SGDh = [alloc(i) for i in range(cfg.n_layer)]
        nbytes = torch.finfo(dtype).bits // 8
        self.bytes_per_token = int(kv_bytes_per_token(cfg, nbytes, G) * len(owned) // cfg.n_layer)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_SGDh + self.v_SGDh if t is not None)
