"""One pipelined Redis connection for the request path's scripts: the commands of one event-loop turn
go out in one write, replies are matched to callers in order, so concurrent requests share one socket.

redis-py opens the connection (address, AUTH, HELLO, db, TLS); then the pipe takes the transport over:
commands are packed by hiredis in C, and the transport hands what it reads straight to a hiredis
reader whose replies resolve the callers' futures in the same callback. No task, no stream reader and
no per-read timeout scope per round trip: a reply costs its waiter one wake-up (figures in
docs/benchmarks.md "Auth and a per-key rate limit on").
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["RedisPipe"]

_HIGH_WATER = 1 << 16
"""Bytes buffered in the socket's transport before a writer waits for them to drain."""
_MORE = object()
"""What the hiredis reader returns while a reply is still incomplete."""


class _Replies(asyncio.Protocol):
    """The connection's protocol once it is the pipe's: every reply goes to the oldest waiter."""

    def __init__(self, pipe: RedisPipe, waiting: collections.deque[asyncio.Future[Any]], loop: Any) -> None:
        self._pipe = pipe
        self._waiting = waiting
        self._loop = loop
        self._reader = hiredis.Reader(protocolError=InvalidResponse, replyError=BaseParser.parse_error,
                                      notEnoughData=_MORE)
        self.transport: Any = None
        self.streams: tuple[Any, Any] = (None, None)
        self.progress = loop.time()
        """When a reply last arrived or the queue last started from empty (a stalled server's clock)."""
        self.drained: asyncio.Future[None] | None = None
        """Set while the transport's buffer is above its high-water mark (a writer waits on it)."""

    def data_received(self, data: bytes) -> None:
        reader, waiting = self._reader, self._waiting
        reader.feed(data)
        try:
            while (reply := reader.gets()) is not _MORE:
                if not waiting:
                    raise InvalidResponse("Redis sent a reply no command was waiting for")
                fut = waiting.popleft()
                if fut.done():  # its caller gave up (timeout): the reply is stale
                    continue
                if isinstance(reply, Exception):  # an error reply belongs to one command only
                    fut.set_exception(reply)
                else:
                    fut.set_result(reply)
        except Exception as exc:  # noqa: BLE001 - a garbled stream fails every caller waiting on it
            self._pipe._lost(self, exc)
        self.progress = self._loop.time()

    def connection_lost(self, exc: Exception | None) -> None:
        self._pipe._lost(self, exc or RedisConnectionError("Redis closed the connection"))
        self._wake()

    def pause_writing(self) -> None:
        if self.drained is None:
            self.drained = self._loop.create_future()

    def resume_writing(self) -> None:
        self._wake()

    def _wake(self) -> None:
        drained, self.drained = self.drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)


class RedisPipe:
    """Commands over one connection made from a `redis.asyncio.Redis` client's pool settings
    (address, AUTH, db, TLS, timeouts). Not for Redis Cluster, whose client routes by slot."""

    def __init__(self, client: Redis) -> None:
        self._pool: Any = client.connection_pool
        timeout = self._pool.connection_kwargs.get("socket_timeout")
        self._stall_s: float | None = float(timeout) if timeout else None
        """A reply owed this long fails its connection (redis-py's socket timeout, as before)."""
        self._proto: _Replies | None = None
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._connecting = asyncio.Lock()
        self._out: list[bytes] = []
        """Packed commands of this loop turn, written together at its end (one syscall under load)."""
        self.writes = 0
        """Writes made (each is one round trip for the commands in it)."""

    @staticmethod
    def supports(client: object) -> bool:
        return isinstance(client, Redis)

    async def execute(self, *args: Any) -> Any:
        proto = self._proto
        if proto is None or self._stalled(proto):
            proto = await self._connect()
        fut = self._queue(proto, args)
        if proto.drained is not None:
            await proto.drained
        return await fut

    def send_nowait(self, *args: Any) -> asyncio.Future[Any] | None:
        """Queue a command in this loop turn's write without waiting for its reply (fire and forget:
        the reply, or the error, lands in the returned future); None, and nothing sent, while the
        connection is down (the next `execute` reconnects)."""
        proto = self._proto
        if proto is None:
            return None
        return self._queue(proto, args)

    def _queue(self, proto: _Replies, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        """Append a command to this loop turn's write (scheduled at the turn's end) and a future for
        its reply, in order."""
        loop = proto._loop
        if not self._out:
            loop.call_soon(self._write, proto)
        self._out.append(hiredis.pack_command(args))
        fut: asyncio.Future[Any] = loop.create_future()
        if not self._waiting:
            proto.progress = loop.time()
        self._waiting.append(fut)
        return fut

    def write_now(self) -> None:
        """Write what this turn queued now rather than at the end of the turn."""
        if self._out and self._proto is not None:
            self._write(self._proto)

    def _write(self, proto: _Replies) -> None:
        out, self._out = self._out, []
        if not out or proto is not self._proto:  # dropped meanwhile: its callers have failed already
            return
        self.writes += 1
        try:
            proto.transport.write(out[0] if len(out) == 1 else b"".join(out))
        except Exception as exc:  # noqa: BLE001 - closed under us: fail the callers, not the loop
            self._lost(proto, RedisConnectionError(f"Redis write failed: {type(exc).__name__}"))

    def _stalled(self, proto: _Replies) -> bool:
        """A reply owed for longer than the socket timeout: the server (or the path to it) hangs."""
        return (self._stall_s is not None and bool(self._waiting)
                and proto._loop.time() - proto.progress > self._stall_s)

    async def _connect(self) -> _Replies:
        async with self._connecting:
            proto = self._proto
            if proto is not None and not self._stalled(proto):
                return proto
            self._drop(RedisTimeoutError("Redis did not answer within the socket timeout") if proto is not None
                       else RedisConnectionError("Redis connection lost"))
            conn = self._pool.make_connection()
            await conn.connect()  # redis-py's handshake: AUTH, HELLO, SELECT, client name
            transport = conn._writer.transport
            proto = _Replies(self, self._waiting, asyncio.get_running_loop())
            proto.transport = transport
            transport.set_protocol(proto)
            transport.set_write_buffer_limits(high=_HIGH_WATER)
            # The transport is the pipe's now (closed by _drop): redis-py's object lets go of it, and the
            # pipe keeps its stream writer, whose finaliser would close the transport.
            proto.streams = (conn._reader, conn._writer)
            conn._reader = conn._writer = None
            self._proto = proto
            return proto

    def _lost(self, proto: _Replies, exc: BaseException) -> None:
        if proto is self._proto:
            transport = self._drop(exc)
            with contextlib.suppress(Exception):
                transport.close()

    def _fail_pending(self, exc: BaseException) -> None:
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_exception(exc)

    def _drop(self, exc: BaseException) -> Any:
        """Forget the connection: every caller still waiting on it fails; returns its transport."""
        proto, self._proto = self._proto, None
        self._out = []
        self._fail_pending(exc)
        if proto is None:
            return None
        proto._wake()
        return proto.transport

    async def reset(self) -> None:
        """Drop the connection (after a caller timed out on it); the next command reconnects."""
        transport = self._drop(RedisConnectionError("Redis connection reset after a timeout"))
        if transport is not None:
            with contextlib.suppress(Exception):
                transport.close()

    async def close(self) -> None:
        await self.reset()
