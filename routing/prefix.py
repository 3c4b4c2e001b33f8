"""Prefix-cache affinity data: chained block hashes of a prompt and the :class:`PrefixIndex` that maps them to endpoints.

:class:`ApproxPrefixIndex` learns only from the gateway's own picks; a KV-event-fed index can replace it.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from routing.types import RoutingRequest

__all__ = ["ApproxPrefixIndex", "PrefixIndex", "block_hashes", "request_seed", "stable_block_key"]


def request_seed(req: RoutingRequest) -> bytes:
    # KV blocks are only shared within one model, one adapter and one cache_salt, so all three seed
    # the chain; otherwise two tenants' identical prompts would look like hits for each other.
    return "\x00".join((req.model, req.lora or "", req.cache_salt or "")).encode()


def block_hashes(data: bytes, block_size: int, seed: bytes, max_blocks: int) -> list[int]:
    """Hash full ``block_size``-byte blocks, each hash covering everything before it (like vLLM's).

    Python's built-in ``hash`` of a (parent, bytes) tuple is ~5x cheaper than a blake2b per block on
    the hot path, but it is salted per process: fine for the in-process index, never for a value
    that must agree across gateway replicas (use :func:`stable_block_key` for those).
    """
    n = min(len(data) // block_size, max_blocks)
    h = hash(seed)
    out: list[int] = []
    for start in range(0, n * block_size, block_size):
        h = hash((h, data[start : start + block_size]))
        out.append(h)
    return out


def stable_block_key(data: bytes, block_size: int, seed: bytes) -> int | None:
    """A process-independent 64-bit key of the prompt's first full block; None if it has none."""
    if len(data) < block_size:
        return None
    digest = hashlib.blake2b(seed + data[:block_size], digest_size=8).digest()
    return int.from_bytes(digest, "little")


@runtime_checkable
class PrefixIndex(Protocol):
    """Where a request's prompt prefix is probably cached."""

    def match(self, req: RoutingRequest, endpoints: Sequence[str]) -> list[float]:
        """For each endpoint, the fraction of the prompt believed cached there, in [0, 1]."""
        ...

    def observe(self, req: RoutingRequest, endpoint: str) -> None:
        """The request was sent to ``endpoint``; its prefix will be cached there."""
        ...

    def drop(self, endpoint: str) -> None:
        """Forget everything about ``endpoint`` (restart, removal)."""
        ...


class ApproxPrefixIndex:
    """Block hash -> endpoints, with a bounded LRU of hashes per endpoint so memory stays fixed.

    The capacity per endpoint should match what the engine can keep; ``capacity_of`` returns it in
    blocks per endpoint (the scorer derives it from the scraped KV capacity).
    """

    def __init__(
        self,
        block_size: int,
        max_blocks: int,
        capacity_of: Callable[[str], int],
        tail_first: bool = False,
    ) -> None:
        self.block_size = block_size
        # Evict a prompt's last blocks before its first, as the engines do (vLLM frees a request's blocks
        # tail first, so those are the least recently used): a prefix then fades to a shorter match instead
        # of vanishing with its first block.
        self._tail_first = tail_first
        self.max_blocks = max_blocks
        self._capacity_of = capacity_of
        self._holders: dict[int, dict[str, None]] = {}
        self._lru: dict[str, OrderedDict[int, None]] = {}
        # Schedule then observe usually hash the same request back to back.
        self._memo: tuple[RoutingRequest, list[int]] | None = None

    def hashes(self, req: RoutingRequest) -> list[int]:
        memo = self._memo
        if memo is not None and memo[0] is req:
            return memo[1]
        hashes = block_hashes(req.prompt, self.block_size, request_seed(req), self.max_blocks)
        self._memo = (req, hashes)
        return hashes

    def matched_blocks(self, hashes: Sequence[int]) -> dict[str, int]:
        """Leading blocks of ``hashes`` each endpoint holds (contiguous from the start)."""
        out: dict[str, int] = {}
        alive: set[str] | None = None
        previous: dict[str, None] | None = None
        get = self._holders.get
        i = 0
        for i, h in enumerate(hashes):
            holders = get(h)
            if not holders:
                break
            if holders == previous:  # the usual case: the same replicas hold the next block too
                continue
            previous = holders
            if alive is None:
                alive = set(holders)
                continue
            now = alive.intersection(holders)
            for gone in alive - now:
                out[gone] = i
            alive = now
            if not alive:
                break
        else:
            i = len(hashes)
        for e in alive or ():
            out[e] = i
        return out

    def match(self, req: RoutingRequest, endpoints: Sequence[str]) -> list[float]:
        hashes = self.hashes(req)
        if not hashes:
            return [0.0] * len(endpoints)
        matched = self.matched_blocks(hashes)
        return [matched.get(e, 0) / len(hashes) for e in endpoints]

    def observe(self, req: RoutingRequest, endpoint: str) -> None:
        hashes = self.hashes(req)
        lru = self._lru.setdefault(endpoint, OrderedDict())
        refresh, holders = lru.move_to_end, self._holders
        for h in (reversed(hashes) if self._tail_first else hashes):
            if h in lru:
                refresh(h)
            else:
                lru[h] = None
                holders.setdefault(h, {})[endpoint] = None
        capacity = max(1, self._capacity_of(endpoint))
        while len(lru) > capacity:
            old, _ = lru.popitem(last=False)
            self._forget(old, endpoint)

    def drop(self, endpoint: str) -> None:
        for h in self._lru.pop(endpoint, {}):
            self._forget(h, endpoint)

    def _forget(self, h: int, endpoint: str) -> None:
        holders = self._holders.get(h)
        if holders is not None:
            holders.pop(endpoint, None)
            if not holders:
                del self._holders[h]

    def size(self, endpoint: str) -> int:
        return len(self._lru.get(endpoint, ()))


def _mix(x: int) -> int:
    # splitmix64's finaliser: cheap, and every input bit reaches every output bit.
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def endpoint_key(name: str) -> int:
    """A process-independent 64-bit key for an endpoint name (``hash(str)`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def rendezvous(key: int, endpoints: Sequence[str], keys: Callable[[str], int] = endpoint_key) -> str:
    """Highest-random-weight owner of ``key`` among ``endpoints``.

    Every gateway replica computes the same owner without coordination, and removing an endpoint
    moves only the keys it owned.
    """
    return max(endpoints, key=lambda e: _mix(key ^ keys(e)))
