"""A lean HTTP/1.1 server protocol on `asyncio.Protocol` + `httptools` for the gateway's ASGI app.

What uvicorn's httptools protocol does, with less per request: the scope is built from the raw
header list, the response head is held back until the first body piece so a whole answer leaves in
one `write()` (uvicorn writes head and body apart), and a streamed answer without a length is sent
chunked. Keep-alive, pipelined requests (answered in order, reading paused while one waits), chunked
request bodies, `Expect: 100-continue`, write backpressure and disconnect reporting are here; the
connection limits stay in `gateway/conn_guard.py`, which wraps this protocol as it wraps uvicorn's.
docs/decisions/0006-http-server.md.
"""
from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import unquote

import httptools

log = logging.getLogger("gravity.server")

__all__ = ["WATCH_DISCONNECT", "WHOLE_BODY", "HttpProtocol", "ServerState"]

WATCH_DISCONNECT = "gravity.watch_disconnect"
"""ASGI scope extension: `watch(callback)` calls back when the client leaves mid-response."""
WHOLE_BODY = "gravity.whole_body"
"""ASGI scope extension: `whole_body()` is the request's body when all of it has arrived and none was
received yet (then it counts as received), else None: the caller reads it with receive() as usual."""

ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]

_REASONS = {100: "Continue", 200: "OK", 201: "Created", 204: "No Content", 301: "Moved Permanently",
            302: "Found", 304: "Not Modified", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict",
            413: "Payload Too Large", 415: "Unsupported Media Type", 422: "Unprocessable Entity",
            429: "Too Many Requests", 431: "Request Header Fields Too Large", 499: "Client Closed Request",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
            504: "Gateway Timeout"}
_STATUS_LINES: dict[int, bytes] = {}
_BAD_REQUEST_BODY = b"Invalid HTTP request received."
_BAD_REQUEST = (b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(_BAD_REQUEST_BODY), _BAD_REQUEST_BODY))
_SERVER_ERROR_BODY = (b'{"error":{"message":"The gateway failed to answer.","type":"server_error",'
                      b'"param":null,"code":"internal_error"}}')
_HIGH_WATER = 1024 * 1024
"""Request body bytes buffered for the app above which the client's socket is no longer read."""


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\n".encode("latin-1")
        if len(_STATUS_LINES) < 1000:
            _STATUS_LINES[status] = line
    return line


class ServerState:
    """What all connections of one server share: the app, the lifespan's state, the open connections."""

    def __init__(self, app: ASGIApp, lifespan_state: dict[str, Any] | None = None) -> None:
        self.app = app
        self.lifespan_state = lifespan_state if lifespan_state is not None else {}
        self.connections: set[HttpProtocol] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.closing = False
        self._date = b""
        self._date_at = 0.0

    def date_header(self) -> bytes:
        now = time.time()
        if now - self._date_at >= 1.0:
            self._date_at = now
            self._date = b"date: " + email.utils.formatdate(now, usegmt=True).encode() + b"\r\n"
        return self._date


class _Cycle:
    """One request and its response."""

    __slots__ = (
        "_head",
        "_head_only",
        "body",
        "body_size",
        "chunked",
        "complete",
        "delivered",
        "expect_continue",
        "keep_alive",
        "on_gone",
        "proto",
        "response_complete",
        "response_started",
        "scope",
        "waiter",
    )

    def __init__(self, proto: HttpProtocol, scope: dict[str, Any], keep_alive: bool, expect_continue: bool) -> None:
        self.proto = proto
        self.scope = scope
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.body: deque[bytes] = deque()
        self.body_size = 0
        self.complete = False
        """The request's last body byte arrived."""
        self.delivered = False
        """The app has received the last body message."""
        self.waiter: asyncio.Future[None] | None = None
        self.response_started = False
        self.response_complete = False
        self.chunked = False
        self._head: bytes | None = None
        self._head_only = scope["method"] == "HEAD"
        self.on_gone: Callable[[], None] | None = None
        scope["extensions"] = {WATCH_DISCONNECT: self.watch, WHOLE_BODY: self.whole_body}

    def whole_body(self) -> bytes | None:
        if not self.complete or self.delivered or self.proto.lost:
            return None
        body = self.body
        data = body.popleft() if len(body) == 1 else b"".join(body)
        body.clear()
        self.body_size = 0
        self.delivered = True
        self.expect_continue = False
        self.proto.resume()
        return data

    def watch(self, on_gone: Callable[[], None] | None) -> None:
        """Call `on_gone` if the client leaves before the response ends (None: stop watching). Saves the
        app a task blocked in receive() per request."""
        self.on_gone = on_gone
        if on_gone is not None and self.proto.lost and not self.response_complete:
            on_gone()

    def gone(self) -> None:
        self.wake()
        on_gone, self.on_gone = self.on_gone, None
        if on_gone is not None and not self.response_complete:
            on_gone()

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- ASGI receive -----------------------------------------------------------------------------------
    async def receive(self) -> dict[str, Any]:
        proto = self.proto
        if self.expect_continue and not self.complete and not proto.lost:
            self.expect_continue = False
            proto.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        # After the whole body was handed over, receive() waits for the client to leave (ASGI).
        while not self.body and (not self.complete or self.delivered) and not proto.lost \
                and not self.response_complete:
            self.waiter = proto.loop.create_future()
            proto.resume()
            try:
                await self.waiter
            finally:
                self.waiter = None
        if self.response_complete or (proto.lost and not self.body):
            return {"type": "http.disconnect"}
        if self.body:
            body = self.body.popleft() if len(self.body) == 1 else b"".join(self.body)
            self.body.clear()
            self.body_size = 0
            proto.resume()
        else:
            body = b""
        if self.complete:
            self.delivered = True
        return {"type": "http.request", "body": body, "more_body": not self.complete}

    # -- ASGI send --------------------------------------------------------------------------------------
    async def send(self, message: MutableMapping[str, Any]) -> None:
        kind = message["type"]
        proto = self.proto
        if kind == "http.response.start":
            if self.response_started:
                raise RuntimeError("response already started")
            self.response_started = True
            status = message["status"]
            parts = [_status_line(status), proto.state.date_header()]
            length = False
            for name, value in message.get("headers", ()):
                lname = name.lower()
                if lname == b"content-length":
                    length = True
                elif lname == b"connection" and value.lower() == b"close":
                    self.keep_alive = False
                    continue
                elif lname == b"transfer-encoding":
                    continue  # framing is the server's
                parts.append(b"%s: %s\r\n" % (name, value))
            if not length and status >= 200 and status not in (204, 304):
                self.chunked = True
            self._head = b"".join(parts)
            return
        if kind != "http.response.body":
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        if not self.response_started or self.response_complete:
            raise RuntimeError("response body outside a response")
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if not more:
            # Reused only when the request was read whole (else its rest would be parsed as a request).
            self.keep_alive = self.keep_alive and self.complete and not proto.state.closing
        head = self._head
        if head is not None:
            self._head = None
            if self.chunked and not more:
                # The whole answer in one message: it gets a length, not chunks.
                self.chunked = False
                head += b"content-length: %d\r\n" % len(body)
            elif self.chunked:
                head += b"transfer-encoding: chunked\r\n"
            if not self.keep_alive:
                head += b"connection: close\r\n"
            head += b"\r\n"
            out = head if self._head_only else (head + self._frame(body, more) if body or self.chunked else head)
        else:
            out = b"" if self._head_only else self._frame(body, more)
        if not more:
            self.response_complete = True
        if proto.lost:
            return
        if out:
            proto.write(out)
        if not more:
            proto.response_done(self)
        elif proto.write_paused:
            await proto.drain()

    def _frame(self, body: bytes, more: bool) -> bytes:
        if not self.chunked:
            return body
        if not more:
            return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
        return b"%x\r\n%s\r\n" % (len(body), body) if body else b""


class HttpProtocol(asyncio.Protocol):
    """One client connection: parses requests with httptools and runs the ASGI app on each, in order."""

    def __init__(self, state: ServerState, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.state = state
        self.loop = loop or asyncio.get_event_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.lost = False
        self.write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._read_paused = False
        self.server: tuple[str, int] | None = None
        self.client: tuple[str, int] | None = None
        self.cycle: _Cycle | None = None
        """The request being answered."""
        self._queue: deque[_Cycle] = deque()
        """Pipelined requests waiting for the one before them."""
        self._parsing: _Cycle | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []

    # -- asyncio.Protocol -----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.state.connections.add(self)
        server = transport.get_extra_info("sockname")
        client = transport.get_extra_info("peername")
        self.server = (str(server[0]), int(server[1])) if isinstance(server, tuple) else None
        self.client = (str(client[0]), int(client[1])) if isinstance(client, tuple) else None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._bad_request()
        except httptools.HttpParserError:
            self._bad_request()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.state.connections.discard(self)
        for cycle in (self.cycle, self._parsing, *self._queue):
            if cycle is not None:
                cycle.gone()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- httptools callbacks --------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        parsed = httptools.parse_url(self._url)
        raw_path = parsed.path
        path = raw_path.decode("ascii", "replace")
        if "%" in path:
            path = unquote(path)
        headers = self._headers
        method = self.parser.get_method().decode("ascii")
        scope: dict[str, Any] = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": self.parser.get_http_version(), "server": self.server, "client": self.client,
            "scheme": "http", "method": method, "root_path": "", "path": path, "raw_path": raw_path,
            "query_string": parsed.query or b"", "headers": headers, "state": self.state.lifespan_state.copy(),
        }
        expect = any(k == b"expect" and v.lower() == b"100-continue" for k, v in headers)
        cycle = _Cycle(self, scope, self.parser.should_keep_alive(), expect)
        self._parsing = cycle
        if self.cycle is None:
            self._start(cycle)
        else:
            self._queue.append(cycle)
            self.pause()  # answered in order: read no further ahead than one request

    def on_body(self, body: bytes) -> None:
        cycle = self._parsing
        if cycle is None or cycle.response_complete:
            return
        cycle.body.append(body)
        cycle.body_size += len(body)
        if cycle.body_size > _HIGH_WATER:
            self.pause()
        cycle.wake()

    def on_message_complete(self) -> None:
        cycle = self._parsing
        if cycle is None:
            return
        cycle.complete = True
        self._parsing = None
        cycle.wake()

    # -- running the app ------------------------------------------------------------------------------
    def _start(self, cycle: _Cycle) -> None:
        self.cycle = cycle
        task = self.loop.create_task(self._run(cycle))
        self.state.tasks.add(task)
        task.add_done_callback(self.state.tasks.discard)

    async def _run(self, cycle: _Cycle) -> None:
        try:
            await self.state.app(cycle.scope, cycle.receive, cycle.send)
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                log.exception("the app raised while answering a request", exc_info=exc)
            if not cycle.response_started and not self.lost:
                await cycle.send({"type": "http.response.start", "status": 500, "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(_SERVER_ERROR_BODY)).encode())]})
                await cycle.send({"type": "http.response.body", "body": _SERVER_ERROR_BODY})
            elif not cycle.response_complete:
                self.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            if not cycle.response_complete and not self.lost:
                if not cycle.response_started:
                    await cycle.send({"type": "http.response.start", "status": 500, "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(_SERVER_ERROR_BODY)).encode())]})
                    await cycle.send({"type": "http.response.body", "body": _SERVER_ERROR_BODY})
                else:
                    self.close()  # the app returned mid-response: the client cannot tell where it ends

    def response_done(self, cycle: _Cycle) -> None:
        """The response's last byte is written: next request, or close."""
        if not cycle.keep_alive:
            self.close()
            return
        self.cycle = None
        if self._queue:
            self._start(self._queue.popleft())
        self.resume()

    # -- I/O helpers ----------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.lost:
            self.transport.write(data)

    async def drain(self) -> None:
        if self.write_paused and not self.lost:
            self._drain = self.loop.create_future()
            await self._drain
            self._drain = None

    def pause(self) -> None:
        if not self._read_paused and self.transport is not None and not self.lost:
            self._read_paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if not self._read_paused or self.lost or self.transport is None:
            return
        if self._queue or (self._parsing is not None and self._parsing.body_size > _HIGH_WATER):
            return
        self._read_paused = False
        self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _bad_request(self) -> None:
        if self.cycle is None or self.cycle.response_complete:
            self.write(_BAD_REQUEST)
        self.close()

    def shutdown(self) -> None:
        """Server stopping: an idle connection closes now, a busy one after its response."""
        if self.cycle is None:
            self.close()
        else:
            self.cycle.keep_alive = False
