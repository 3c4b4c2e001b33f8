"""A pooled HTTP/1.1 client on `asyncio.Protocol` + `httptools` for the data path (`RawTransport`).

aiohttp builds a `ClientRequest`, a `ClientResponse`, multidicts and a writer per request; this
client writes the request in one `write()` and parses the answer with httptools straight into a
dict and a list of body pieces. Same contract as `AiohttpTransport` (gateway/transport.py): the
caller bounds waits with its own deadlines, a pooled connection the backend closed while idle is
re-sent once on a new one (not an attempt), gzip/deflate answers are decoded, a stream is relayed
piece by piece with backpressure. docs/decisions/0005-raw-upstream-client.md.
"""
from __future__ import annotations

import asyncio
import errno
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import Protocol
from urllib.parse import urlsplit

import httptools

from gateway.transport import ConnectFailed, ConnectTimedOut, StreamBroken, UpstreamRequest, UpstreamResponse

__all__ = ["RawPool", "RawTransport"]

_HIGH_WATER = 256 * 1024
"""Undelivered body bytes above which the backend's socket is no longer read (backpressure)."""
_LOW_WATER = 64 * 1024


class _Stale(Exception):
    """A reused connection closed before any byte of the answer (the backend's idle close)."""


class _Conn(asyncio.Protocol):
    """One backend connection; carries one exchange at a time."""

    __slots__ = ("_decoder", "_eof_body", "_head", "_paused", "_waiter", "body", "buffered", "closed",
                 "complete", "content_type", "got_bytes", "headers", "idle_since", "keep_alive", "key", "parser", "pool",
                 "status", "transport")

    def __init__(self, pool: RawPool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.content_type = ""
        self.body: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.got_bytes = False
        self._head: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._decoder: zlib._Decompress | None = None
        self._eof_body = False
        self._paused = False

    # -- asyncio.Protocol ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(StreamBroken(f"malformed response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.status and self._eof_body and not self.complete:
            # No length and not chunked: the body ran to the connection's end.
            self.on_message_complete()
            self.keep_alive = False
            return
        if not self.got_bytes:
            self._fail(_Stale())
        elif not self.complete:
            self._fail(StreamBroken("connection lost mid-response"))

    # -- httptools callbacks ------------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        old = self.headers.get(key)
        self.headers[key] = text if old is None else f"{old}, {text}"

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        h = self.headers
        ctype = h.get("content-type", "")
        self.content_type = ctype.split(";", 1)[0].strip().lower() if ctype else "application/octet-stream"
        encoding = h.get("content-encoding")
        if encoding is not None:
            encoding = encoding.strip().lower()
            if encoding in ("gzip", "x-gzip"):
                self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
            elif encoding == "deflate":
                self._decoder = zlib.decompressobj(zlib.MAX_WBITS)
            elif encoding != "identity":
                self._fail(StreamBroken(f"unsupported content-encoding {encoding!r}"))
                self.close()
                return
        if "content-length" not in h and "chunked" not in h.get("transfer-encoding", "") \
                and self.status not in (204, 304) and self.status >= 200:
            self._eof_body = True
        head = self._head
        if head is not None and not head.done():
            head.set_result(None)

    def on_body(self, data: bytes) -> None:
        if self._decoder is not None:
            try:
                data = self._decoder.decompress(data)
            except zlib.error as exc:
                self._fail(StreamBroken(f"bad compressed body: {exc}"))
                self.close()
                return
            if not data:
                return
        self.body.append(data)
        self.buffered += len(data)
        if self.buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._decoder is not None:
            try:
                rest = self._decoder.flush()
            except zlib.error:
                rest = b""
            if rest:
                self.body.append(rest)
                self.buffered += len(rest)
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()  # reset once the callback returns
        self._wake()

    # -- for the response ---------------------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
        for fut in (self._head, self._waiter):
            if fut is not None and not fut.done():
                fut.set_exception(exc)

    async def wait_head(self) -> None:
        if self.status:
            return
        self._head = asyncio.get_running_loop().create_future()
        if self.closed:  # lost between the write and here
            self.connection_lost(None)
        await self._head

    async def wait_body(self) -> None:
        """Until more body or the end arrives (raises StreamBroken)."""
        if self.closed and not self.complete:
            raise StreamBroken("connection lost mid-response")
        self._waiter = fut = asyncio.get_running_loop().create_future()
        try:
            await fut
        finally:
            self._waiter = None

    def take(self) -> bytes:
        body = self.body
        data = body.popleft() if len(body) == 1 else b"".join(body)
        body.clear()
        self.buffered = 0
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()
        return data

    def finished(self) -> None:
        """The exchange is over: back to the pool when the answer was read whole and the backend keeps it."""
        if self.complete and self.keep_alive and not self.closed and not self._paused:
            self._reset()
            self.pool.put(self)
        else:
            self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _RawResponse:
    __slots__ = ("_conn", "content_type", "headers", "status")

    def __init__(self, conn: _Conn) -> None:
        self._conn: _Conn | None = conn
        self.status = conn.status
        self.headers: Mapping[str, str] = conn.headers
        self.content_type = conn.content_type

    async def read(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise StreamBroken("response already released")
        while not conn.complete:
            await conn.wait_body()
        return conn.take()

    async def chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            raise StreamBroken("response already released")
        while True:
            if conn.body:
                yield conn.take()
            elif conn.complete:
                return
            else:
                await conn.wait_body()

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.finished()


class RawPool:
    """Idle keep-alive connections per (host, port), most recently used first."""

    def __init__(self, connect_timeout_s: float, keepalive_s: float = 60.0) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._urls: dict[str, tuple[tuple[str, int], bytes]] = {}
        self._closed = False

    def target(self, url: str) -> tuple[tuple[str, int], bytes]:
        """(host, port) and the request line's start plus Host header, cached per URL."""
        hit = self._urls.get(url)
        if hit is None:
            parts = urlsplit(url)
            if parts.scheme != "http" or not parts.hostname:
                raise ConnectFailed(f"only http:// backends are served by the raw client ({url})")
            port = parts.port or 80
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            host = parts.netloc
            hit = ((parts.hostname, port), f"POST {path} HTTP/1.1\r\nhost: {host}\r\n".encode("latin-1"))
            if len(self._urls) < 4096:
                self._urls[url] = hit
        return hit

    def get(self, key: tuple[str, int]) -> _Conn | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if now - conn.idle_since > self.keepalive_s:
                conn.close()
                continue
            return conn
        return None

    def put(self, conn: _Conn) -> None:
        if self._closed:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.key, []).append(conn)

    async def connect(self, key: tuple[str, int]) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(lambda: _Conn(self, key), key[0], key[1])
        except TimeoutError as exc:
            raise ConnectTimedOut("connect timeout") from exc
        except OSError as exc:
            raise ConnectFailed(f"{type(exc).__name__}: {exc}", refused=exc.errno == errno.ECONNREFUSED) from exc
        return conn

    def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


class _HasPool(Protocol):
    @property
    def pool(self) -> RawPool: ...


class RawTransport:
    """`Transport` over `RawPool`: one write per request, one re-send after a stale pooled connection.

    Takes the pool's owner (gateway/upstream.py's `Upstream`, opened in the lifespan)."""

    def __init__(self, owner: _HasPool) -> None:
        self._owner = owner
        self.stale_resends = 0

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        pool = self._owner.pool
        key, start = pool.target(request.url)
        parts = [start]
        for k, v in request.headers.items():
            parts.append(f"{k}: {v}\r\n".encode("latin-1"))
        parts.append(b"content-length: %d\r\n\r\n" % len(request.body))
        head = b"".join(parts)
        conn = pool.get(key)
        if conn is not None:
            try:
                return await self._exchange(conn, head, request.body)
            except _Stale:
                self.stale_resends += 1
        conn = await pool.connect(key)
        try:
            return await self._exchange(conn, head, request.body)
        except _Stale:
            raise ConnectFailed("the backend closed the connection without answering") from None

    @staticmethod
    async def _exchange(conn: _Conn, head: bytes, body: bytes) -> _RawResponse:
        transport = conn.transport
        assert transport is not None
        try:
            transport.write(head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                transport.write(body)
            await conn.wait_head()
        except BaseException:
            conn.close()  # cancelled (deadline, client gone) or failed: never reused mid-exchange
            raise
        return _RawResponse(conn)
