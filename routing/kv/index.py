"""The block index: block key -> the endpoints holding it (and on which medium), bounded by an LRU cap.

Keys are 64-bit ints (vLLM's block hashes, or the gateway's own keys of their tokens). Lookups cost
one dict probe per block of the prompt, stopping at the first block nobody holds.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

__all__ = ["DEFAULT_MAX_KEYS", "KVBlockIndex"]

# 2^20 keys: 8 h100-8b replicas hold 8 x 30,720 = 245,760 blocks, so this covers ~4x that fleet.
# Measured ~330 bytes per key with one holder (docs/kv-events.md), i.e. ~350 MB at the cap.
DEFAULT_MAX_KEYS = 1 << 20


class KVBlockIndex:
    """``key -> {endpoint: medium}``; past ``max_keys`` keys the least recently stored key is dropped."""

    def __init__(self, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be positive")
        self.max_keys = max_keys
        self._holders: OrderedDict[int, dict[str, str]] = OrderedDict()
        self._by_endpoint: dict[str, set[int]] = {}
        self.evicted = 0  # keys dropped by the cap (not by engine events)

    def __len__(self) -> int:
        return len(self._holders)

    def add(self, endpoint: str, keys: Iterable[int], medium: str = "GPU") -> None:
        holders_of, mine = self._holders, self._by_endpoint.setdefault(endpoint, set())
        for key in keys:
            holders = holders_of.get(key)
            if holders is None:
                holders_of[key] = {endpoint: medium}
            else:
                holders[endpoint] = medium
                holders_of.move_to_end(key)
            mine.add(key)
        while len(holders_of) > self.max_keys:
            key, holders = holders_of.popitem(last=False)
            self.evicted += 1
            for e in holders:
                self._by_endpoint[e].discard(key)

    def remove(self, endpoint: str, keys: Iterable[int]) -> None:
        mine = self._by_endpoint.get(endpoint)
        if mine is None:
            return
        holders_of = self._holders
        for key in keys:
            holders = holders_of.get(key)
            if holders is not None and holders.pop(endpoint, None) is not None:
                mine.discard(key)
                if not holders:
                    del holders_of[key]

    def clear(self, endpoint: str) -> int:
        """Forget everything ``endpoint`` holds; returns how many keys it held."""
        mine = self._by_endpoint.pop(endpoint, set())
        holders_of = self._holders
        for key in mine:
            holders = holders_of.get(key)
            if holders is not None:
                holders.pop(endpoint, None)
                if not holders:
                    del holders_of[key]
        return len(mine)

    def count(self, endpoint: str) -> int:
        return len(self._by_endpoint.get(endpoint, ()))

    def holders(self, key: int) -> dict[str, str]:
        return dict(self._holders.get(key, {}))

    def matched_blocks(self, keys: Sequence[int], endpoints: Iterable[str],
                       cpu_weight: float = 1.0) -> dict[str, float]:
        """For each endpoint, how many leading blocks of ``keys`` it holds (contiguous from the start).

        A block an endpoint holds only on a slower medium (CPU) counts ``cpu_weight``; the run goes on.
        O(blocks) dict probes; per-endpoint work only where the holders change from one block to the next.
        """
        alive = set(endpoints)
        out = dict.fromkeys(alive, 0.0)
        get = self._holders.get
        previous: dict[str, str] | None = None
        saw_cpu = False
        i = 0
        for i, key in enumerate(keys):
            holders = get(key)
            if not holders:
                break
            if holders == previous:
                continue  # the usual case: the same endpoints hold the next block too
            previous = holders
            for e in [e for e in alive if e not in holders]:
                out[e] = float(i)
                alive.discard(e)
            if not alive:
                break
            saw_cpu = saw_cpu or any(m != "GPU" for m in holders.values())
        else:
            i = len(keys)
        for e in alive:
            out[e] = float(i)
        if saw_cpu and cpu_weight != 1.0:
            for e, run in out.items():  # rare: discount the run's CPU-only blocks
                cpu = sum(1 for key in keys[:int(run)] if self._holders[key].get(e) != "GPU")
                out[e] = run - cpu * (1.0 - cpu_weight)
        return out
