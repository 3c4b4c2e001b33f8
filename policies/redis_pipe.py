"""One pipelined Redis connection for the limiter's scripts: the commands of one event-loop turn go
out in one write, replies are matched to callers in order, so concurrent requests share one socket.

redis-py's `execute_command` costs ~50 µs of CPU per call (pool checkout, a task per write through
`wait_for`, retry and observability hooks); this costs about half (figures in docs/policies.md).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

__all__ = ["RedisPipe"]

_HIGH_WATER = 1 << 16
"""Bytes buffered in the socket's transport before a writer waits for them to drain."""


class RedisPipe:
    """Commands over one connection made from a `redis.asyncio.Redis` client's pool settings
    (address, AUTH, db, TLS, timeouts). Not for Redis Cluster, whose client routes by slot."""

    def __init__(self, client: Redis) -> None:
        self._pool: Any = client.connection_pool
        self._conn: Any = None
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._reader: asyncio.Task[None] | None = None
        self._connecting = asyncio.Lock()
        self._out: list[bytes] = []
        """Packed commands of this loop turn, written together at its end (one syscall under load)."""
        self.writes = 0
        """Writes made (each is one round trip for the commands in it)."""

    @staticmethod
    def supports(client: object) -> bool:
        return isinstance(client, Redis)

    async def execute(self, *args: Any) -> Any:
        conn = self._conn
        if conn is None or not conn.is_connected:
            conn = await self._connect()
        fut = self._queue(conn, args)
        # Its private writer: send_packed_command would spawn a task per write (through wait_for).
        writer = conn._writer
        if writer.transport.get_write_buffer_size() > _HIGH_WATER:
            await writer.drain()
        return await fut

    def send_nowait(self, *args: Any) -> asyncio.Future[Any] | None:
        """Queue a command in this loop turn's write without waiting for its reply (fire and forget:
        the reply, or the error, lands in the returned future); None, and nothing sent, while the
        connection is down (the next `execute` reconnects)."""
        conn = self._conn
        if conn is None or not conn.is_connected:
            return None
        return self._queue(conn, args)

    def _queue(self, conn: Any, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        """Append a command to this loop turn's write (scheduled at the turn's end) and a future for
        its reply, in order; start the reader if none runs."""
        loop = asyncio.get_running_loop()
        if not self._out:
            loop.call_soon(self._write, conn)
        self._out += conn.pack_command(*args)
        fut: asyncio.Future[Any] = loop.create_future()
        self._waiting.append(fut)
        if self._reader is None:
            self._reader = asyncio.create_task(self._read(conn), name="gravity-limiter-redis")
        return fut

    def write_now(self) -> None:
        """Write what this turn queued now rather than at the end of the turn."""
        if self._out and self._conn is not None:
            self._write(self._conn)

    def _write(self, conn: Any) -> None:
        out, self._out = self._out, []
        if not out or conn is not self._conn:  # dropped meanwhile: its callers have failed already
            return
        self.writes += 1
        try:
            conn._writer.writelines(out)
        except Exception as exc:  # noqa: BLE001 - closed under us: fail the callers, not the loop
            self._drop(RedisConnectionError(f"Redis write failed: {type(exc).__name__}"))

    async def _connect(self) -> Any:
        async with self._connecting:
            if self._conn is None or not self._conn.is_connected:
                self._drop(RedisConnectionError("Redis connection lost"))
                conn = self._pool.make_connection()
                await conn.connect()
                self._conn = conn
            return self._conn

    async def _read(self, conn: Any) -> None:
        """Hand each reply to the oldest caller; runs while replies are owed (so the socket's read
        timeout only ever measures a command's wait, never idleness)."""
        try:
            while self._waiting:
                try:
                    reply: Any = await conn.read_response()
                except ResponseError as exc:  # an error reply belongs to one command only
                    reply = exc
                fut = self._waiting.popleft()
                if fut.done():  # its caller gave up (timeout): the reply is stale
                    continue
                if isinstance(reply, ResponseError):
                    fut.set_exception(reply)
                else:
                    fut.set_result(reply)
        except Exception as exc:  # noqa: BLE001 - a broken connection fails every caller waiting on it
            self._fail_pending(exc)
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)
        finally:
            if self._reader is asyncio.current_task():
                self._reader = None

    def _fail_pending(self, exc: BaseException) -> None:
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_exception(exc)

    def _drop(self, exc: BaseException) -> Any:
        """Forget the connection: its reader stops and every caller still waiting on it fails."""
        conn, self._conn = self._conn, None
        self._out = []
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        self._fail_pending(exc)
        return conn

    async def reset(self) -> None:
        """Drop the connection (after a caller timed out on it); the next command reconnects."""
        conn = self._drop(RedisConnectionError("Redis connection reset after a timeout"))
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)

    async def close(self) -> None:
        await self.reset()
