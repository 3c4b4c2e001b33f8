"""Paged KV cache with automatic prefix caching, modelled on vLLM v1's block pool.

Blocks are hashed by a chain over FULL blocks (parent hash, tokens, extra keys); free blocks keep
their hash until reused, so the least recently freed cached blocks are evicted first (LRU).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any, Protocol

# Hash of the (absent) parent of the first block. vLLM seeds this randomly per process; a constant
# keeps replays reproducible, and hashes never leave the process.
NONE_HASH = 0


def block_extra_keys(block_index: int, cache_salt: str | None, lora: str | None) -> tuple[object, ...]:
    """Extra keys mixed into a block's hash: the LoRA name on every block, the salt on the first."""
    keys: tuple[object, ...] = ()
    if lora is not None:
        keys += (("lora", lora),)
    if block_index == 0 and cache_salt is not None:
        keys += (("salt", cache_salt),)
    return keys


def hash_block(parent: int, tokens: tuple[int, ...], extra: tuple[object, ...]) -> int:
    return hash((parent, tokens, extra))


def extend_block_hashes(hashes: list[int], token_ids: Sequence[int], block_size: int,
                        cache_salt: str | None = None, lora: str | None = None) -> list[int]:
    """Append the hashes of every FULL block of `token_ids` not yet in `hashes`, in place."""
    full = len(token_ids) // block_size
    parent = hashes[-1] if hashes else NONE_HASH
    for i in range(len(hashes), full):
        tokens = tuple(token_ids[i * block_size:(i + 1) * block_size])
        parent = hash_block(parent, tokens, block_extra_keys(i, cache_salt, lora))
        hashes.append(parent)
    return hashes


def block_hashes(token_ids: Sequence[int], block_size: int, cache_salt: str | None = None,
                 lora: str | None = None) -> list[int]:
    return extend_block_hashes([], token_ids, block_size, cache_salt, lora)


class BlockHasher(Protocol):
    """How an engine names its blocks: this module's default, or vLLM's own (simulator/vllm_hash.py)."""

    def extend(self, hashes: list[Any], token_ids: Sequence[int], block_size: int,
               cache_salt: str | None = None, lora: str | None = None) -> list[Any]: ...


class PythonHasher:
    """The default: Python's ``hash`` of (parent, tokens, extra keys), cheap and process-local."""

    @staticmethod
    def extend(hashes: list[Any], token_ids: Sequence[int], block_size: int,
               cache_salt: str | None = None, lora: str | None = None) -> list[Any]:
        return extend_block_hashes(hashes, token_ids, block_size, cache_salt, lora)


class CacheListener(Protocol):
    """Told when a hash leaves the prefix cache or the cache is wiped (KV events, simulator/kv_events.py)."""

    def removed(self, h: Hashable) -> None: ...

    def cleared(self) -> None: ...


class KVCache:
    """A pool of `num_blocks` blocks with ref counts, a hash->block map and an LRU free queue.

    Owners (sequences) hold lists of block ids; the cache never sees sequences, only their lists.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}
        # Insertion order is eviction order: popitem(last=False) takes the least recently freed.
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.listener: CacheListener | None = None

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def usage(self) -> float:
        """Fraction of blocks held by live sequences; cached-but-free blocks count as free, as in vLLM."""
        return 1.0 - len(self._free) / self.num_blocks

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def computed_blocks(self, hashes: Sequence[int]) -> list[int]:
        """The blocks holding the longest cached prefix of `hashes` (no side effects)."""
        if not self.enable_prefix_caching:
            return []
        found: list[int] = []
        for h in hashes:
            block = self._cached.get(h)
            if block is None:
                break
            found.append(block)
        return found

    # ---- mutations -----------------------------------------------------------------------
    def can_allocate(self, owned: Sequence[int], computed: Sequence[int], num_tokens: int) -> bool:
        return self._needed(owned, computed, num_tokens) <= self._available(computed)

    def allocate(self, owned: list[int], computed: Sequence[int], num_tokens: int) -> bool:
        """Grow `owned` (in place) to hold `num_tokens`, first taking `computed` cache hits.

        Returns False, changing nothing, when free blocks run out.
        """
        needed = self._needed(owned, computed, num_tokens)
        if needed > self._available(computed):
            return False
        for block in computed:
            if self._ref[block] == 0:
                del self._free[block]
            self._ref[block] += 1
            owned.append(block)
        for _ in range(needed):
            block, _ = self._free.popitem(last=False)
            old = self._hash[block]
            if old is not None:
                # Evict: the block is reused, so its content is no longer a cache hit.
                if self._cached.get(old) == block:
                    del self._cached[old]
                    if self.listener is not None:
                        self.listener.removed(old)
                self._hash[block] = None
            self._ref[block] = 1
            owned.append(block)
        return True

    def cache_blocks(self, owned: Sequence[int], hashes: Sequence[int], start: int, end: int) -> list[int]:
        """Publish blocks `owned[start:end]` under their hashes; returns the indices whose hash is new here.

        The engine calls this when it allocates a step's blocks, before the step computes them, as
        vLLM v1's ``KVCacheManager.allocate_slots`` does: requests scheduled later may hit them.
        """
        new: list[int] = []
        if not self.enable_prefix_caching:
            return new
        for i in range(start, end):
            block, h = owned[i], hashes[i]
            if self._hash[block] is not None:
                continue
            self._hash[block] = h
            # A duplicate computed concurrently by another sequence stays private, as in vLLM.
            if self._cached.setdefault(h, block) == block:
                new.append(i)
        return new

    def uncache(self, owned: Sequence[int], start: int, end: int) -> None:
        """Withdraw blocks `owned[start:end]` from the prefix cache (published, never computed)."""
        for block in owned[start:end]:
            h = self._hash[block]
            if h is None:
                continue
            if self._cached.get(h) == block:
                del self._cached[h]
                if self.listener is not None:
                    self.listener.removed(h)
            self._hash[block] = None

    def free(self, owned: list[int]) -> None:
        """Drop one reference to each block; tail blocks are freed first so they are evicted first."""
        for block in reversed(owned):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                self._free[block] = None
        owned.clear()

    def reset(self) -> bool:
        """Forget every cached hash; refused (False) while any block is in use, like vLLM."""
        if len(self._free) != self.num_blocks:
            return False
        self._cached.clear()
        self._hash = [None] * self.num_blocks
        if self.listener is not None:
            self.listener.cleared()
        return True

    # ---- helpers -------------------------------------------------------------------------
    def _needed(self, owned: Sequence[int], computed: Sequence[int], num_tokens: int) -> int:
        total = -(-num_tokens // self.block_size)
        return max(0, total - len(owned) - len(computed))

    def _available(self, computed: Sequence[int]) -> int:
        # Free cache hits are about to be touched, so they cannot also serve as fresh blocks.
        touched_free = sum(1 for b in computed if self._ref[b] == 0)
        return len(self._free) - touched_free
