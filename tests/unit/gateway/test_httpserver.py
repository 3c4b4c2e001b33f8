"""The gateway's own HTTP/1.1 server protocol over real loopback sockets, with a small ASGI app.

What a client (or an attacker) can do on one connection: pipeline requests, send chunked bodies,
ask for 100-continue, send garbage, leave mid-request, or get an answer before its body was read.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import pytest

from gateway.httpserver import HttpProtocol, ServerState

Scope = MutableMapping[str, Any]


class App:
    def __init__(self) -> None:
        self.disconnected = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        path = scope["path"]
        if path == "/early":  # answers without reading the body
            await send({"type": "http.response.start", "status": 413, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"no"})
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        if path == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            for i in range(3):
                await send({"type": "http.response.body", "body": b"piece%d;" % i, "more_body": True})
                await asyncio.sleep(0.3)
            await send({"type": "http.response.body", "body": b""})
            return
        if path == "/wait":  # until the client leaves
            assert (await receive())["type"] == "http.disconnect"
            self.disconnected.set()
            return
        out = scope["method"].encode() + b" " + scope["raw_path"] + b" " + body
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": out})


@pytest.fixture
async def server() -> AsyncIterator[tuple[int, App]]:
    app = App()
    state = ServerState(app)
    srv = await asyncio.get_running_loop().create_server(lambda: HttpProtocol(state), "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1], app
    finally:
        srv.close()
        for conn in list(state.connections):
            conn.close()


async def _read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = next((int(x.split(b":")[1]) for x in lines if x.startswith(b"content-length:")), None)
    if length is not None:
        return head, await reader.readexactly(length)
    assert b"transfer-encoding: chunked" in lines
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return head, body
        body += chunk[:-2]


async def test_pipelined_requests_are_answered_in_order(server: tuple[int, App]) -> None:
    port, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\n1"
                 b"POST /b HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\n2"
                 b"GET /c HTTP/1.1\r\nhost: x\r\n\r\n")
    answers = [(await _read_response(reader))[1] for _ in range(3)]
    assert answers == [b"POST /a 1", b"POST /b 2", b"GET /c "]
    writer.close()


async def test_a_chunked_request_body_arrives_whole(server: tuple[int, App]) -> None:
    port, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /x HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(b"2\r\nde\r\n0\r\n\r\n")
    head, body = await _read_response(reader)
    assert head.startswith(b"HTTP/1.1 200") and body == b"POST /x abcde"
    writer.close()


async def test_expect_100_continue_is_answered_before_the_body(server: tuple[int, App]) -> None:
    port, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n")
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100")
    writer.write(b"ok")
    _, body = await _read_response(reader)
    assert body == b"POST /x ok"
    writer.close()


async def test_a_streamed_answer_is_chunked_and_arrives_as_sent(server: tuple[int, App]) -> None:
    port, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
    t0 = time.monotonic()
    head = await reader.readuntil(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    size = int((await reader.readuntil(b"\r\n")).strip(), 16)
    first = await reader.readexactly(size + 2)
    assert first == b"piece0;\r\n"
    assert time.monotonic() - t0 < 0.25, "the first piece waited for the rest"
    _, rest = await _read_response_rest(reader)
    assert rest == b"piece1;piece2;"
    writer.close()


async def _read_response_rest(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return b"", body
        body += chunk[:-2]


async def test_an_answer_before_the_body_was_read_closes_the_connection(server: tuple[int, App]) -> None:
    """The unread rest of the body must not be parsed as the next request (request smuggling)."""
    port, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /early HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nGET /c HTTP/1.1\r\n\r\n")
    head, body = await _read_response(reader)
    assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower() and body == b"no"
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing more answered
    writer.close()


async def test_garbage_gets_400_and_a_close(server: tuple[int, App]) -> None:
    port, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x00\x01 nonsense\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 5)
    assert data.startswith(b"HTTP/1.1 400")
    writer.close()


async def test_a_client_that_leaves_is_reported_to_the_app(server: tuple[int, App]) -> None:
    port, app = server
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /wait HTTP/1.1\r\nhost: x\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()
    await asyncio.wait_for(app.disconnected.wait(), 5)


async def test_http_1_0_is_answered_and_closed(server: tuple[int, App]) -> None:
    port, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /old HTTP/1.0\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 5)
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"GET /old ")
    writer.close()
