"""White-box tests of the paged KV cache manager: exact block ids, reference counts, hashes, LRU eviction.

Block size 4, 8 blocks; the free queue starts as [0, 1, ..., 7] and allocation takes from its head.
"""

from dataclasses import dataclass

import pytest
import torch
from conftest import tiny_cfg

from moekit.counts import kv_bytes_per_token
from moekit.infer.kv_cache import KVCacheManager, PagedKVCache, hash_block, num_blocks_for


@dataclass
class Req:
    request_id: str
    all_token_ids: list[int]
    num_computed_tokens: int = 0


def refs(kv: KVCacheManager) -> list[int]:
    return [b.ref_cnt for b in kv.pool.blocks]


def free_order(kv: KVCacheManager) -> list[int]:
    return list(kv.pool.free)


def admit(kv: KVCacheManager, req: Req) -> int:
    """What the scheduler does for a new request: prefix lookup, then slots for the rest."""
    hits, n_hit = kv.get_computed_blocks(req)
    assert kv.allocate_slots(req, len(req.all_token_ids) - n_hit, hits)
    req.num_computed_tokens = len(req.all_token_ids)
    return n_hit


def test_allocation_block_ids_refcounts_and_hashes():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = Req("a", list(range(10)))
    assert admit(kv, a) == 0
    assert kv.block_ids("a") == [0, 1, 2]
    assert refs(kv) == [1, 1, 1, 0, 0, 0, 0, 0]
    assert free_order(kv) == [3, 4, 5, 6, 7]
    # Only the two full blocks are cached; their hashes chain (block 1's names tokens 0..7).
    h0 = hash_block(None, [0, 1, 2, 3])
    h1 = hash_block(h0, [4, 5, 6, 7])
    assert kv.pool.blocks[0].block_hash == h0 and kv.pool.blocks[1].block_hash == h1
    assert kv.pool.blocks[2].block_hash is None
    assert set(kv.pool.cached) == {h0, h1}
    # The same tokens after another prefix hash differently.
    assert hash_block(hash_block(None, [9, 9, 9, 9]), [4, 5, 6, 7]) != h1

    # Decoding: a token per step; a new block only when the last one is full.
    a.all_token_ids += [10, 11]
    assert kv.allocate_slots(a, 2) and kv.block_ids("a") == [0, 1, 2]
    a.num_computed_tokens = 12
    assert kv.pool.blocks[2].block_hash == hash_block(h1, [8, 9, 10, 11])  # now full: cached
    a.all_token_ids.append(12)
    assert kv.allocate_slots(a, 1) and kv.block_ids("a") == [0, 1, 2, 3]
    kv.free(a)
    kv.check_whole()


def test_prefix_hit_shares_blocks_and_counts_references():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = Req("a", list(range(10)))
    admit(kv, a)
    b = Req("b", list(range(8)) + [50, 51, 52])
    assert admit(kv, b) == 8  # two blocks from the cache
    assert kv.block_ids("b") == [0, 1, 3]
    assert refs(kv) == [2, 2, 1, 1, 0, 0, 0, 0]
    assert kv.hits == 8 and kv.queries == 21

    kv.free(a)  # released last block first: block 2 reaches 0 and joins the free queue's tail
    assert refs(kv) == [1, 1, 0, 1, 0, 0, 0, 0]
    assert free_order(kv) == [4, 5, 6, 7, 2]
    kv.free(b)  # b's blocks 3, 1, 0 in that order: the prefix's first block is evicted last
    assert free_order(kv) == [4, 5, 6, 7, 2, 3, 1, 0]
    kv.check_whole()

    # Free blocks keep their contents: a hit takes block 0 and 1 back out of the free queue.
    c = Req("c", list(range(8)) + [60])
    assert admit(kv, c) == 8
    assert kv.block_ids("c") == [0, 1, 4]
    assert free_order(kv) == [5, 6, 7, 2, 3]
    kv.free(c)
    kv.check_whole()


def test_at_least_one_token_is_left_to_compute():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = Req("a", list(range(8)))
    admit(kv, a)
    b = Req("b", list(range(8)))  # the same 8-token prompt: only the first block may be reused
    assert admit(kv, b) == 4
    assert kv.block_ids("b") == [0, 2]
    kv.free(a)
    kv.free(b)
    kv.check_whole()


def test_lru_eviction_takes_least_recently_freed_and_breaks_the_chain():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = Req("a", list(range(12)) + [99])
    admit(kv, a)  # blocks 0, 1, 2 cached, 3 partial
    kv.free(a)
    assert free_order(kv) == [4, 5, 6, 7, 3, 2, 1, 0]
    big = Req("big", [1000 + i for i in range(27)])  # 7 blocks: takes 4, 5, 6, 7, 3, 2, 1
    assert admit(kv, big) == 0
    assert kv.block_ids("big") == [4, 5, 6, 7, 3, 2, 1]
    assert kv.pool.num_evictions == 2  # blocks 2 and 1 held cached prefixes
    assert kv.pool.blocks[0].block_hash == hash_block(None, [0, 1, 2, 3])  # the oldest part survives
    kv.free(big)
    c = Req("c", list(range(12)) + [7])
    assert admit(kv, c) == 4  # block 0 still hits; block 1's hash was evicted, so the chain stops there
    kv.free(c)
    kv.check_whole()


def test_allocation_failure_changes_nothing_and_counts_free_hits():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = Req("a", list(range(9)))
    admit(kv, a)  # blocks 0, 1, 2
    before = (refs(kv), free_order(kv), kv.block_ids("a"))
    b = Req("b", list(range(100, 108)))
    assert not kv.allocate_slots(b, 8)  # needs 2 blocks, 1 free
    assert (refs(kv), free_order(kv), kv.block_ids("a")) == before and kv.block_ids("b") == []
    kv.free(a)
    # A cache hit on a free block uses up that free block: 4 free, 2 hits (free) + 3 new > 4.
    c = Req("c", list(range(8)) + list(range(200, 212)))
    hits, n = kv.get_computed_blocks(c)
    assert [h.block_id for h in hits] == [0, 1] and n == 8
    assert not kv.allocate_slots(c, 12, hits)
    assert refs(kv) == [0, 0, 0, 0]
    assert kv.allocate_slots(c, 8, hits)  # 2 hits + 2 new = 4 fits
    kv.free(c)
    kv.check_whole()


def test_trim_releases_blocks_past_the_kept_tokens():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = Req("a", list(range(6)))
    admit(kv, a)
    assert kv.allocate_slots(a, 5)  # e.g. 1 token + 4 draft tokens: up to 11 tokens, 3 blocks
    assert kv.block_ids("a") == [0, 1, 2]
    kv.trim(a, 7)  # 2 drafts kept: 7 tokens need 2 blocks
    assert kv.block_ids("a") == [0, 1] and refs(kv)[2] == 0 and free_order(kv)[-1] == 2
    kv.free(a)
    kv.check_whole()


def test_pool_sized_from_memory_budget():
    cfg = tiny_cfg()
    per_token = kv_bytes_per_token(cfg, 4)  # fp32: 2 x 2 layers x 2 KV heads x 8 dims x 4 B = 256 B
    assert per_token == 256
    n = num_blocks_for(cfg, 1 / 1024, 16, torch.float32)  # 1 MiB
    assert n == 2**20 // (256 * 16) == 256
    cache = PagedKVCache(cfg, n, 16, torch.float32)
    assert cache.nbytes == (n * 16 + 1) * per_token and cache.k_SGDh[0].shape == (n * 16 + 1, 2, 8)  # + scratch
    with pytest.raises(ValueError, match="kv-cache-gb"):
        num_blocks_for(cfg, 0, 16, torch.float32)
    mqa = tiny_cfg(n_kv_head=1)
    assert kv_bytes_per_token(mqa, 4) == per_token // 2  # K/V stored per KV head: MQA halves it here
