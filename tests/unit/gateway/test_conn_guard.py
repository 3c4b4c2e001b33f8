from __future__ import annotations

import asyncio
from typing import Any

from gateway.conn_guard import ConnectionGuard, ConnectionLimits


class Transport:
    """The transport seam: what the guard writes and whether it closed."""

    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer, self.written, self.closed = peer, b"", False

    def get_extra_info(self, name: str) -> Any:
        return self.peer if name == "peername" else None

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


class Inner(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


LIMITS = ConnectionLimits(header_timeout_s=0.05, idle_timeout_s=0.1, max_connections=2, max_head_bytes=100)


def _open(guard: ConnectionGuard, port: int) -> tuple[Any, Transport, Inner]:
    inner = Inner()
    proto = guard.protocol_class(lambda: inner)()  # type: ignore[arg-type,misc]
    transport = Transport(("127.0.0.1", port))
    proto.connection_made(transport)
    return proto, transport, inner


async def test_a_head_split_across_packets_ends_the_head_deadline() -> None:
    guard = ConnectionGuard(LIMITS)
    proto, transport, inner = _open(guard, 1)
    proto.data_received(b"GET / HTTP/1.1\r\nHost: x\r")
    proto.data_received(b"\n\r\n")
    await asyncio.sleep(0.08)
    assert not transport.closed and inner.data.endswith(b"\r\n\r\n")
    guard.response_done(("127.0.0.1", 1))
    await asyncio.sleep(0.15)
    assert transport.closed and transport.written == b"", "idle connections close without an answer"


async def test_pipelined_requests_keep_the_connection_busy_until_both_are_answered() -> None:
    guard = ConnectionGuard(LIMITS)
    proto, transport, _ = _open(guard, 1)
    proto.data_received(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
    guard.response_done(("127.0.0.1", 1))
    await asyncio.sleep(0.15)
    assert not transport.closed
    guard.response_done(("127.0.0.1", 1))
    await asyncio.sleep(0.15)
    assert transport.closed


async def test_slow_head_gets_408_huge_head_431_and_the_cap_503() -> None:
    guard = ConnectionGuard(LIMITS)
    proto, transport, _ = _open(guard, 1)
    proto.data_received(b"GET / HTTP/1.1\r\n")
    await asyncio.sleep(0.08)
    assert transport.closed and transport.written.startswith(b"HTTP/1.1 408")
    proto.connection_lost(None)
    big, big_t, _ = _open(guard, 2)
    big.data_received(b"GET / HTTP/1.1\r\nX: " + b"a" * 200)
    assert big_t.closed and big_t.written.startswith(b"HTTP/1.1 431")
    big.connection_lost(None)  # what a real transport does after close()
    _open(guard, 3)
    _open(guard, 4)
    _, refused, inner = _open(guard, 5)
    assert refused.closed and refused.written.startswith(b"HTTP/1.1 503") and inner.data == b""
    assert guard.refused == 1
