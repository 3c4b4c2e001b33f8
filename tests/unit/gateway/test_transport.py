"""Both transports (aiohttp, raw httptools) against a real loopback server: stale keep-alive connections,
refused connections, gzip, chunked and streamed bodies, backpressure.

The server answers the first request on each connection and keeps the connection open (keep-alive),
then closes it without answering when the next request arrives on it: what a backend whose idle
timeout fires just as the gateway reuses the pooled connection looks like to the client.
"""
from __future__ import annotations

import asyncio
import gzip
import socket
import struct
import time
from collections.abc import AsyncIterator
from typing import Any, Self

import pytest

from gateway.config import ServerConfig
from gateway.rawclient import RawTransport
from gateway.transport import AiohttpTransport, ConnectFailed, StreamBroken, UpstreamRequest
from gateway.upstream import Upstream


class LoopbackServer:
    """A server on a free loopback port for the test's lifetime; subclasses answer in `_serve`."""

    port = 0
    _server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


class IdleClosingServer(LoopbackServer):
    def __init__(self, reset: bool) -> None:
        self.reset = reset
        """Close with an RST (SO_LINGER 0) instead of a FIN."""
        self.connections = 0
        self.answered = 0
        self.dropped = 0

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


@pytest.fixture(params=["aiohttp", "raw"])
async def upstream(request: pytest.FixtureRequest) -> AsyncIterator[Upstream]:
    up = Upstream(ServerConfig(upstream_client=request.param))
    await up.open()
    try:
        yield up
    finally:
        await up.close()


def _transport(up: Upstream) -> AiohttpTransport | RawTransport:
    return RawTransport(up) if up.client == "raw" else AiohttpTransport(up)


def _request(port: int) -> UpstreamRequest:
    return UpstreamRequest(f"http://127.0.0.1:{port}/v1/chat/completions", {"content-type": "application/json"},
                           b'{"model":"m"}')


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
async def test_a_stale_pooled_connection_is_resent_once_on_a_fresh_one_and_is_no_attempt(
        upstream: Upstream, reset: bool) -> None:
    transport = _transport(upstream)
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
    transport = _transport(upstream)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectFailed) as info:
        await transport.send(_request(port))
    assert info.value.refused
    assert transport.stale_resends == 0


class ScriptedServer(LoopbackServer):
    """Answers each request with `script(writer)`: raw bytes, so the answer's framing is the test's."""

    def __init__(self, script: Any) -> None:
        self.script = script

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            await self.script(writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_a_gzip_answer_is_decoded(upstream: Upstream) -> None:
    payload = b'{"usage":{"total_tokens":3}}' * 50
    packed = gzip.compress(payload)

    async def script(w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n"
                b"content-length: %d\r\n\r\n" % len(packed) + packed)
        await w.drain()

    async with ScriptedServer(script) as server:
        resp = await _transport(upstream).send(_request(server.port))
        assert await resp.read() == payload
        resp.release()


async def test_a_chunked_stream_arrives_piece_by_piece_as_sent(upstream: Upstream) -> None:
    """Each SSE event reaches the caller when the backend sends it, not when the answer ends."""
    gap = 0.3

    async def script(w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for i in range(3):
            event = b"data: %d\n\n" % i
            w.write(b"%x\r\n%s\r\n" % (len(event), event))
            await w.drain()
            await asyncio.sleep(gap)
        w.write(b"0\r\n\r\n")
        await w.drain()

    async with ScriptedServer(script) as server:
        resp = await _transport(upstream).send(_request(server.port))
        assert resp.content_type == "text/event-stream"
        got: list[tuple[float, bytes]] = []
        t0 = time.monotonic()
        async for piece in resp.chunks():
            got.append((time.monotonic() - t0, piece))
        resp.release()
    assert b"".join(p for _, p in got) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert len(got) >= 3
    # The first event came before the second was sent (well within the gap, whatever the machine's load).
    assert got[0][0] < gap * 0.8


async def test_a_body_without_length_runs_to_the_close(upstream: Upstream) -> None:
    async def script(w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n{\"a\":")
        await w.drain()
        w.write(b"1}")
        await w.drain()

    async with ScriptedServer(script) as server:
        resp = await _transport(upstream).send(_request(server.port))
        assert await resp.read() == b'{"a":1}'
        resp.release()


async def test_a_connection_lost_mid_body_is_a_broken_stream(upstream: Upstream) -> None:
    async def script(w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"a\":")
        await w.drain()

    async with ScriptedServer(script) as server:
        resp = await _transport(upstream).send(_request(server.port))
        with pytest.raises(StreamBroken):
            await resp.read()
        resp.release()


async def test_a_slow_reader_stops_the_backend_socket_being_read() -> None:
    """Backpressure: with nobody taking the body, the client holds a bounded amount, not the whole answer."""
    up = Upstream(ServerConfig(upstream_client="raw"))
    await up.open()
    total = 64 * 1024 * 1024
    sent = 0

    async def script(w: asyncio.StreamWriter) -> None:
        nonlocal sent
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n" % total)
        block = b"x" * 65536
        while sent < total:
            w.write(block)
            sent += len(block)
            await w.drain()

    try:
        async with ScriptedServer(script) as server:
            resp = await RawTransport(up).send(_request(server.port))
            chunks = resp.chunks()
            await anext(chunks)
            await asyncio.sleep(1.0)  # the reader stalls; the backend keeps trying to send
            assert sent < 16 * 1024 * 1024, f"{sent} bytes sent to a reader that took one piece"
            resp.release()
    finally:
        await up.close()
