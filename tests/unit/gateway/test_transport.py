"""AiohttpTransport against a real loopback server: stale keep-alive connections and refused connections.

The server answers the first request on each connection and keeps the connection open (keep-alive),
then closes it without answering when the next request arrives on it: what a backend whose idle
timeout fires just as the gateway reuses the pooled connection looks like to the client.
"""
from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from typing import Self

import pytest

from gateway.config import ServerConfig
from gateway.transport import AiohttpTransport, ConnectFailed, UpstreamRequest
from gateway.upstream import Upstream


class IdleClosingServer:
    def __init__(self, reset: bool) -> None:
        self.reset = reset
        """Close with an RST (SO_LINGER 0) instead of a FIN."""
        self.connections = 0
        self.answered = 0
        self.dropped = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                if served:
                    # The idle timeout fired: the request is dropped unanswered, the connection closed.
                    self.dropped += 1
                    if self.reset:
                        sock = writer.get_extra_info("socket")
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.close()
                    return
                served += 1
                self.answered += 1
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n"
                             b"connection: keep-alive\r\n\r\n{\"ok\":true}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream(ServerConfig())
    await up.open()
    try:
        yield up
    finally:
        await up.close()


def _request(port: int) -> UpstreamRequest:
    return UpstreamRequest(f"http://127.0.0.1:{port}/v1/chat/completions", {"content-type": "application/json"},
                           b'{"model":"m"}')


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
async def test_a_stale_pooled_connection_is_resent_once_on_a_fresh_one_and_is_no_attempt(
        upstream: Upstream, reset: bool) -> None:
    transport = AiohttpTransport(upstream)
    async with IdleClosingServer(reset) as server:
        first = await transport.send(_request(server.port))
        assert first.status == 200 and await first.read() == b'{"ok":true}'
        first.release()  # back to the pool, kept alive
        # The pooled connection is dead by the time it is used: one call still answers 200.
        second = await transport.send(_request(server.port))
        assert second.status == 200 and await second.read() == b'{"ok":true}'
        second.release()
        assert server.dropped == 1, "the pooled connection was not reused: the test proved nothing"
        assert transport.stale_resends == 1
        assert server.answered == 2 and server.connections == 2


async def test_a_refused_connection_is_an_attempt_failure_not_a_resend(upstream: Upstream) -> None:
    transport = AiohttpTransport(upstream)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectFailed) as info:
        await transport.send(_request(port))
    assert info.value.refused
    assert transport.stale_resends == 0
