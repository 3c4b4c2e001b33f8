"""What the gateway knows from KV events, per endpoint: the block index, sequence tracking, cold marks.

Two ways to key the index (docs/kv-events.md): ``engine`` keys by the engine's own block hashes (the
gateway must hash requests exactly as the engine does: same algorithm, seed and tokenization);
``tokens`` keys by the gateway's hash of the ``token_ids`` each ``BlockStored`` carries, as llm-d
does, keeping an engine-hash -> key map per endpoint for ``BlockRemoved``, so the engine's algorithm
and seed need not be known. Pure: the subscriber (gateway/kv_subscriber.py) does the I/O.
"""
from __future__ import annotations

import array
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import xxhash

from routing.kv.index import DEFAULT_MAX_KEYS, KVBlockIndex
from routing.kv.pending import PendingExchange
from routing.kv.wire import Batch, Cleared, Removed, Stored

__all__ = ["EndpointKV", "KVEventState", "KeyMode", "SeqVerdict", "SequenceTracker", "token_block_keys"]

KeyMode = Literal["engine", "tokens"]
_ROOT = 0x9E3779B97F4A7C15  # parent key of a chain's first block in "tokens" mode
SeqVerdict = Literal["next", "gap", "restart", "first"]


def _extra_bytes(extra: Any) -> bytes:
    if not extra:
        return b""
    return "\x1f".join(str(x) for x in extra).encode()


def token_block_keys(parent: int, token_ids: Sequence[int], block_size: int,
                     extras: Sequence[Any] | None = None) -> list[int]:
    """The gateway's own chained 64-bit keys of full blocks: XXH3-64 of each block's token ids (32-bit
    little-endian), seeded with the parent's key; a block with extra keys (LoRA name, cache_salt, as
    vLLM publishes them untagged in ``extras[i]``) mixes them in the same way.
    """
    n = len(token_ids) // block_size
    packed = memoryview(_pack(token_ids[:n * block_size]))
    step = 4 * block_size
    digest = xxhash.xxh3_64_intdigest
    out: list[int] = []
    for i in range(n):
        extra = extras[i] if extras is not None and i < len(extras) else None
        if extra:
            parent = digest(_extra_bytes(extra), parent)
        parent = digest(packed[i * step:(i + 1) * step], parent)
        out.append(parent)
    return out


def _pack(tokens: Sequence[int]) -> bytes:
    # 32-bit little-endian ids on every machine: gateway replicas must compute the same keys.
    if _NATIVE_OK:
        arr = array.array("I", tokens)
        if sys.byteorder == "big":
            arr.byteswap()
        return arr.tobytes()
    return struct.pack(f"<{len(tokens)}I", *tokens)


_NATIVE_OK = array.array("I").itemsize == 4
ROOT_KEY = _ROOT


class SequenceTracker:
    """Classifies each batch's sequence number: the next one, a gap, an engine restart, a repeat."""

    def __init__(self) -> None:
        self.last: int | None = None

    def see(self, seq: int) -> SeqVerdict:
        last = self.last
        if last is None:
            self.last = seq
            return "first"
        if seq == last + 1:
            self.last = seq
            return "next"
        if seq > last + 1:
            return "gap"  # the caller replays or resyncs, then calls accept()
        # PUB/SUB never delivers twice: a number that goes back is a new engine process counting
        # from 0 again (its first batches may have been lost on the way).
        self.last = seq
        return "restart"

    def accept(self, seq: int) -> None:
        self.last = seq


@dataclass
class EndpointKV:
    """One endpoint's event-fed view, as the scorer and /admin see it."""

    name: str
    block_size: int | None = None  # learned from BlockStored
    batches: int = 0
    events: int = 0
    last_event_at: float | None = None
    cold_until: float = 0.0  # after a resync: entries before the gap are unknown until then
    resyncs: int = 0
    replays: int = 0
    restarts: int = 0
    clears: int = 0
    orphan_blocks: int = 0  # "tokens" mode: stored blocks whose parent key was unknown
    decode_errors: int = 0

    def describe(self, now: float, held: int) -> dict[str, Any]:
        return {"block_size": self.block_size, "blocks_held": held, "batches": self.batches, "events": self.events,
                "last_event_age_s": None if self.last_event_at is None else round(now - self.last_event_at, 3),
                "cold": now < self.cold_until, "resyncs": self.resyncs, "replays": self.replays,
                "restarts": self.restarts, "clears": self.clears, "orphan_blocks": self.orphan_blocks,
                "decode_errors": self.decode_errors}


class KVEventState:
    """Applies decoded batches to one :class:`KVBlockIndex`, keyed per ``mode``; single writer."""

    def __init__(self, mode: KeyMode = "tokens", *, max_keys: int = DEFAULT_MAX_KEYS, cold_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.mode = mode
        self.index = KVBlockIndex(max_keys)
        self.cold_s = cold_s
        self._clock = clock
        self._endpoints: dict[str, EndpointKV] = {}
        self._engine_to_key: dict[str, dict[int, int]] = {}  # "tokens" mode only
        self._listeners: list[Callable[[str, Sequence[int]], None]] = []
        self._forget_listeners: list[Callable[[str], None]] = []
        self._removed_listeners: list[Callable[[str, Sequence[int]], None]] = []
        self.pending = PendingExchange()
        """The precise scorer's marks shared with other gateway replicas (inactive until a publisher attaches)."""

    # -- readers ---------------------------------------------------------------------------
    def endpoint(self, name: str) -> EndpointKV | None:
        return self._endpoints.get(name)

    def fed(self, name: str) -> bool:
        """Events have been seen from ``name`` (its precise view is meaningful)."""
        ep = self._endpoints.get(name)
        return ep is not None and ep.batches > 0

    def cold(self, name: str) -> bool:
        ep = self._endpoints.get(name)
        return ep is not None and self._clock() < ep.cold_until

    def block_size(self, name: str) -> int | None:
        ep = self._endpoints.get(name)
        return None if ep is None else ep.block_size

    def describe(self) -> dict[str, Any]:
        now = self._clock()
        return {"mode": self.mode, "keys": len(self.index), "max_keys": self.index.max_keys,
                "evicted_by_cap": self.index.evicted,
                "endpoints": {n: ep.describe(now, self.index.count(n)) for n, ep in self._endpoints.items()}}

    def on_stored(self, listener: Callable[[str, Sequence[int]], None]) -> None:
        """Called with (endpoint, keys) after keys are stored (the scorer clears its pending marks)."""
        self._listeners.append(listener)

    def on_removed(self, listener: Callable[[str, Sequence[int]], None]) -> None:
        """Called with (endpoint, keys) after the engine reported those keys evicted."""
        self._removed_listeners.append(listener)

    def on_forget(self, listener: Callable[[str], None]) -> None:
        """Called with the endpoint whenever its entries are dropped (clear, restart, resync)."""
        self._forget_listeners.append(listener)

    # -- writers ---------------------------------------------------------------------------
    def register(self, name: str) -> EndpointKV:
        ep = self._endpoints.get(name)
        if ep is None:
            ep = self._endpoints[name] = EndpointKV(name)
        return ep

    def apply(self, name: str, batch: Batch) -> None:
        ep = self.register(name)
        ep.batches += 1
        ep.events += len(batch.events)
        ep.last_event_at = self._clock()
        for ev in batch.events:
            if isinstance(ev, Stored):
                ep.block_size = ev.block_size
                keys = self._store(name, ev, ep)
                if keys:
                    self.index.add(name, keys, ev.medium)
                    for listener in self._listeners:
                        listener(name, keys)
            elif isinstance(ev, Removed):
                gone = self._unkey(name, ev.block_hashes)
                self.index.remove(name, gone)
                for removed in self._removed_listeners:
                    removed(name, gone)
            elif isinstance(ev, Cleared):
                ep.clears += 1
                self._forget(name)

    def restarted(self, name: str) -> None:
        """The engine restarted (sequence went back to 0, or the scraper saw a restart): empty cache."""
        self.register(name).restarts += 1
        self._forget(name)

    def resync(self, name: str) -> None:
        """Events were lost and could not be replayed: drop the endpoint's entries and mark it cold."""
        ep = self.register(name)
        ep.resyncs += 1
        ep.cold_until = self._clock() + self.cold_s
        self._forget(name)

    def drop(self, name: str) -> None:
        self._forget(name)

    def _forget(self, name: str) -> None:
        self.index.clear(name)
        self._engine_to_key.pop(name, None)
        for listener in self._forget_listeners:
            listener(name)

    def _store(self, name: str, ev: Stored, ep: EndpointKV) -> list[int]:
        if self.mode == "engine":
            return ev.block_hashes
        mapping = self._engine_to_key.setdefault(name, {})
        if ev.parent_block_hash is None:
            parent = _ROOT
        else:
            known = mapping.get(ev.parent_block_hash)
            if known is None:
                ep.orphan_blocks += len(ev.block_hashes)
                return []
            parent = known
        extras = ev.extra_keys
        if extras is None and ev.lora_name is not None:
            extras = [[ev.lora_name]] * len(ev.block_hashes)
        keys = token_block_keys(parent, ev.token_ids, ev.block_size, extras)
        for engine_hash, key in zip(ev.block_hashes, keys, strict=False):
            mapping[engine_hash] = key
        return keys

    def _unkey(self, name: str, hashes: Sequence[int]) -> list[int]:
        if self.mode == "engine":
            return list(hashes)
        mapping = self._engine_to_key.get(name)
        if not mapping:
            return []
        return [k for h in hashes if (k := mapping.pop(h, None)) is not None]
