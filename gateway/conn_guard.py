"""Connection limits of the gateway's own, below any HTTP server: open connections, head and idle deadlines.

A protocol wrapper sits between the event loop's transport and whatever HTTP protocol the server
uses (uvicorn's httptools one today), so a slow or silent client is closed whatever the server's
own settings do (uvicorn's h11_* limits do nothing under httptools). The body deadline lives in
`read_body`, where the ASGI side knows when a body is complete. docs/edges.md, "Connection limits".
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

__all__ = ["ConnectionGuard", "ConnectionLimits", "GuardedProtocol"]

_END_OF_HEAD = b"\r\n\r\n"
_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
_TOO_LARGE = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
_BUSY_BODY = (b'{"error":{"message":"The gateway has too many open connections.","type":"server_error",'
              b'"param":null,"code":"too_many_connections"}}')
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\nretry-after: 1\r\n"
         b"content-type: application/json\r\ncontent-length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n"
         + _BUSY_BODY)


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    """From a connection's first byte (or its opening) to the end of the request head."""
    idle_timeout_s: float = 75.0
    """A keep-alive connection with no request in progress is closed after this long."""
    max_connections: int = 4096
    """Connections beyond this get a 503 and are closed at once."""
    max_head_bytes: int = 64 * 1024
    """A request head larger than this gets a 431."""


class ConnectionGuard:
    """Counts the open connections and finds one by its peer address for the ASGI side."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._by_peer: dict[tuple[Any, ...], GuardedProtocol] = {}
        self.refused = 0
        self.timed_out = 0

    @property
    def open(self) -> int:
        return len(self._by_peer)

    def protocol_class(self, inner: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
        """A protocol class for a server that builds protocols from a class (uvicorn's `http=`)."""
        guard = self

        class Guarded(GuardedProtocol):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(guard, inner(*args, **kwargs))

        return Guarded

    def response_done(self, peer: Any) -> None:
        """The ASGI app finished a response on the connection from `peer`: it is idle now."""
        if peer is None:
            return
        proto = self._by_peer.get(tuple(peer))
        if proto is not None:
            proto.idle()

    def _register(self, peer: tuple[Any, ...], proto: GuardedProtocol) -> bool:
        if len(self._by_peer) >= self.limits.max_connections:
            self.refused += 1
            return False
        self._by_peer[peer] = proto
        return True

    def _forget(self, peer: tuple[Any, ...] | None, proto: GuardedProtocol) -> None:
        if peer is not None and self._by_peer.get(peer) is proto:
            del self._by_peer[peer]


class GuardedProtocol(asyncio.Protocol):
    """Delegates to the server's protocol; closes the connection when a deadline passes.

    It counts request heads seen (the end of a head is the first blank line) against responses the
    app finished: with none outstanding the connection is idle. Pipelined requests count as
    outstanding; a body that happens to contain a blank line only keeps a connection open longer."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._guard = guard
        self._inner = inner
        self._loop = loop or asyncio.get_event_loop()
        self._transport: asyncio.Transport | None = None
        self._peer: tuple[Any, ...] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._due: float | None = None
        """When the current deadline passes (loop time); None: no deadline now."""
        self._respond = True
        self._outstanding = 0
        """Request heads received whose responses the app has not finished."""
        self._head_bytes = 0
        """Bytes of the request head being read (0 between requests)."""
        self._tail = b""
        self._closed = False

    # -- asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without subclassing it.
        self._transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self._peer = tuple(peer) if isinstance(peer, (tuple, list)) else (id(self),)
        if not self._guard._register(self._peer, self):
            self._peer = None
            self._closed = True
            transport.write(_BUSY)  # type: ignore[attr-defined]
            transport.close()
            return
        self._inner.connection_made(transport)
        self._arm(self._guard.limits.header_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        if self._outstanding == 0 and self._head_bytes == 0:
            # The first byte of a request on a kept-alive connection: its head deadline starts.
            self._arm(self._guard.limits.header_timeout_s)
        self._scan(data)
        if not self._closed:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._stop_timer()
        self._guard._forget(self._peer, self)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    # -- the deadlines --------------------------------------------------------------------------------
    def idle(self) -> None:
        """A response ended; with no other request outstanding, wait at most the idle timeout."""
        if self._closed:
            return
        self._outstanding = max(0, self._outstanding - 1)
        if self._outstanding == 0 and self._head_bytes == 0:
            self._arm(self._guard.limits.idle_timeout_s, respond=False)

    def _scan(self, data: bytes) -> None:
        window = self._tail + data
        start, heads = 0, 0
        while (cut := window.find(_END_OF_HEAD, start)) >= 0:
            heads += 1
            start = cut + 4
        self._tail = window[-3:]
        if heads:
            # Bytes after the last blank line are a body or a pipelined head: not counted as head.
            self._outstanding += heads
            self._head_bytes = 0
            self._cancel()  # the request is the app's now; the body deadline is read_body's
        elif self._outstanding == 0:
            self._head_bytes += len(data)
            if self._head_bytes > self._guard.limits.max_head_bytes:
                self._close(_TOO_LARGE)

    # A deadline is a time kept here, not a timer per request: the one timer of a connection wakes
    # at most every min(header, idle) timeout, and only a deadline it finds passed closes anything.
    def _arm(self, delay: float, respond: bool = True) -> None:
        now = self._loop.time()
        due = now + delay
        self._due, self._respond = due, respond
        if self._timer is None or self._timer_at > due:
            self._stop_timer()
            self._schedule(now, due)

    def _cancel(self) -> None:
        self._due = None  # the timer, if one is set, finds nothing due

    def _schedule(self, now: float, due: float) -> None:
        limits = self._guard.limits
        at = min(due, now + min(limits.header_timeout_s, limits.idle_timeout_s))
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._check)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        due = self._due
        if due is None or self._closed:
            return
        now = self._loop.time()
        if now < due:
            self._schedule(now, due)
            return
        self._due = None
        self._expired(self._respond)

    def _expired(self, respond: bool) -> None:
        if self._closed or self._outstanding:
            return
        self._guard.timed_out += 1
        self._close(_TIMEOUT if respond and self._head_bytes else None)

    def _close(self, answer: bytes | None) -> None:
        self._closed = True
        self._stop_timer()
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if answer is not None:
            transport.write(answer)
        transport.close()
