"""KV cache: chained full-block hashes, ref counts, LRU eviction of free cached blocks."""
from __future__ import annotations

import pytest

from simulator.kvcache import KVCache, block_hashes


@pytest.mark.parametrize(("tokens", "n_hashes"), [([], 0), ([1, 2, 3], 0), ([1, 2, 3, 4], 1), (list(range(9)), 2)])
def test_only_full_blocks_are_hashed(tokens: list[int], n_hashes: int) -> None:
    assert len(block_hashes(tokens, 4)) == n_hashes


def test_hashes_chain_on_the_parent() -> None:
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = block_hashes([9, 9, 9, 9, 5, 6, 7, 8], 4)
    assert a[1] != b[1]  # same tokens in block 1, different prefix
    assert block_hashes([1, 2, 3, 4], 4, cache_salt="s") != block_hashes([1, 2, 3, 4], 4)
    assert block_hashes([1, 2, 3, 4], 4, lora="x") != block_hashes([1, 2, 3, 4], 4)


def test_allocate_cache_and_reuse() -> None:
    kv = KVCache(8, 4)
    owned: list[int] = []
    tokens = list(range(10))
    hashes = block_hashes(tokens, 4)
    assert kv.allocate(owned, [], 10) and len(owned) == 3
    kv.cache_blocks(owned, hashes, 0, 2)
    assert kv.usage() == pytest.approx(3 / 8)
    hits = kv.computed_blocks(hashes)
    assert hits == owned[:2]
    other: list[int] = []
    assert kv.allocate(other, hits, 10)
    assert other[:2] == owned[:2] and kv.ref_count(owned[0]) == 2
    kv.free(owned)
    kv.free(other)
    assert kv.usage() == 0.0 and kv.num_cached_blocks == 2


def test_allocation_fails_atomically_when_full() -> None:
    kv = KVCache(4, 4)
    owned: list[int] = []
    assert kv.allocate(owned, [], 12)
    other: list[int] = []
    assert not kv.allocate(other, [], 8)
    assert other == [] and kv.num_free_blocks == 1


def test_free_cached_hits_count_against_fresh_blocks() -> None:
    kv = KVCache(3, 4)
    owned: list[int] = []
    hashes = block_hashes(list(range(8)), 4)
    kv.allocate(owned, [], 8)
    kv.cache_blocks(owned, hashes, 0, 2)
    kv.free(owned)
    hits = kv.computed_blocks(hashes)
    # 2 hits + 2 fresh blocks needs 4 > 3 blocks.
    assert not kv.can_allocate([], hits, 16)
    assert kv.can_allocate([], hits, 12)


def test_eviction_takes_least_recently_freed_and_tail_blocks_first() -> None:
    kv = KVCache(4, 2)
    a: list[int] = []
    ha = block_hashes([1, 1, 2, 2], 2)
    kv.allocate(a, [], 4)
    kv.cache_blocks(a, ha, 0, 2)
    kv.free(a)
    b: list[int] = []
    hb = block_hashes([3, 3, 4, 4], 2)
    kv.allocate(b, [], 4)
    kv.cache_blocks(b, hb, 0, 2)
    kv.free(b)
    # One fresh block: evicts a's TAIL block (freed first of a's pair because freeing runs in reverse).
    c: list[int] = []
    kv.allocate(c, [], 2)
    assert len(kv.computed_blocks(ha)) == 1 and len(kv.computed_blocks(hb)) == 2


def test_reset_refused_while_in_use() -> None:
    kv = KVCache(4, 2)
    owned: list[int] = []
    kv.allocate(owned, [], 2)
    assert not kv.reset()
    kv.free(owned)
    assert kv.reset()


def test_prefix_caching_off_never_hits() -> None:
    kv = KVCache(4, 2, enable_prefix_caching=False)
    owned: list[int] = []
    hashes = block_hashes([1, 2, 3, 4], 2)
    kv.allocate(owned, [], 4)
    kv.cache_blocks(owned, hashes, 0, 2)
    assert kv.computed_blocks(hashes) == []


def test_uncache_withdraws_published_blocks_that_were_never_computed() -> None:
    kv = KVCache(8, 4)
    owned: list[int] = []
    hashes = block_hashes(list(range(12)), 4)
    assert kv.allocate(owned, [], 12)
    kv.cache_blocks(owned, hashes, 0, 3)
    kv.uncache(owned, 1, 3)  # a preempted chunk: blocks 1-2 were allocated but never run
    assert kv.computed_blocks(hashes) == owned[:1]
    kv.free(owned)
    assert kv.num_cached_blocks == 1
