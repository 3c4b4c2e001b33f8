"""Pending marks exchanged between gateway replicas: blocks one replica sent to an engine that the engine
has not reported yet (docs/kv-events.md, "Active-active gateways").

Every replica sees the same KV events, but only the replica that sent a request knows its new blocks are
on their way to that engine until the engine schedules it and reports them. The precise scorer hands
each pick's not-yet-held blocks to a :class:`PendingExchange`; the gateway (``gateway/state/inflight.py``)
sends them to Redis with the in-flight counts, fire-and-forget, and brings the other replicas' back in
the request's one pre-dispatch read; the scorer applies them as if it had made the pick itself. Pure:
no I/O here. Bounded: at most ``max_outbox`` marks wait to be sent and ``max_inbox`` to be applied (the
oldest dropped past that), each of at most ``max_blocks`` keys.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["ForeignMark", "PendingExchange", "pack_keys", "unpack_keys"]


def pack_keys(keys: Sequence[int]) -> bytes:
    """64-bit block keys as 8 bytes each, big-endian (what travels through Redis)."""
    return b"".join(k.to_bytes(8, "big") for k in keys)


def unpack_keys(data: bytes) -> list[int]:
    return [int.from_bytes(data[i:i + 8], "big") for i in range(0, len(data) - len(data) % 8, 8)]


@dataclass(frozen=True)
class ForeignMark:
    endpoint: str
    keys: list[int]
    age_s: float = 0.0  # how long ago the other replica made the pick (its mark expires that much sooner)


class PendingExchange:
    """One gateway process's outbox of its own marks and inbox of the other replicas'."""

    def __init__(self, *, max_blocks: int = 2048, max_outbox: int = 1024, max_inbox: int = 4096) -> None:
        self.max_blocks = max_blocks
        self._outbox: deque[tuple[str, list[int]]] = deque(maxlen=max_outbox)
        self._inbox: deque[ForeignMark] = deque(maxlen=max_inbox)
        self._listener: Callable[[], None] | None = None
        self.sent = self.received = 0

    @property
    def active(self) -> bool:
        """A publisher is attached (shared in-flight state on): marks are worth recording."""
        return self._listener is not None

    def attach(self, listener: Callable[[], None]) -> None:
        """The publisher: called after each mark, so it can send the outbox at the end of the loop turn."""
        self._listener = listener

    # -- this replica's marks --------------------------------------------------------------------
    def mark(self, endpoint: str, keys: Sequence[int]) -> None:
        if self._listener is None or not keys:
            return
        self._outbox.append((endpoint, list(keys[:self.max_blocks])))
        self._listener()

    def take(self) -> list[tuple[str, list[int]]]:
        out = list(self._outbox)
        self._outbox.clear()
        self.sent += len(out)
        return out

    # -- the other replicas' -----------------------------------------------------------------------
    def deliver(self, marks: Sequence[ForeignMark]) -> None:
        self._inbox.extend(marks)
        self.received += len(marks)

    def pull(self) -> list[ForeignMark]:
        """What arrived since the last pull (the scorer calls this before matching)."""
        if not self._inbox:
            return []
        got = list(self._inbox)
        self._inbox.clear()
        return got
