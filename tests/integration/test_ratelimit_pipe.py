"""policies/redis_pipe.py on a real redis-server: replies reach the right callers, error replies stay
with their command, a caller that gave up does not shift the others, and a restarted server is
reconnected to."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from policies.redis_pipe import RedisPipe
from tests.support.procs import start_redis


async def test_concurrent_commands_errors_timeouts_and_a_restart(tmp_path: Path) -> None:
    server = start_redis(tmp_path)
    client = aioredis.Redis(port=server.port, socket_timeout=2)
    pipe = RedisPipe(client)
    try:
        assert RedisPipe.supports(client) and not RedisPipe.supports(object())
        # Many callers at once on one connection, each with its own answer, one error among them.
        replies = await asyncio.gather(*(pipe.execute("ECHO", f"v{i}") for i in range(200)),
                                       pipe.execute("NOSUCHCOMMAND"), return_exceptions=True)
        assert replies[:200] == [f"v{i}".encode() for i in range(200)]
        assert isinstance(replies[200], ResponseError)
        # A caller that stops waiting (the limiter's timeout) leaves the reply order intact.
        slow = asyncio.ensure_future(pipe.execute("BLPOP", "empty", "0.2"))  # blocks the connection
        fast = asyncio.ensure_future(pipe.execute("ECHO", "after"))
        await asyncio.sleep(0.05)
        slow.cancel()
        assert await fast == b"after"
        # The server goes away: callers fail, then the pipe reconnects to the restarted server.
        server.stop()
        with pytest.raises(Exception):  # noqa: B017 - redis-py's ConnectionError or an OSError
            await pipe.execute("PING")
        server = start_redis(tmp_path, server.port)
        assert await pipe.execute("PING") == b"PONG"
    finally:
        await pipe.close()
        await client.aclose()
        server.stop()
