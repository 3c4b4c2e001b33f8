"""Redis clients that time every command and script as the gateway waits for it (gravity_redis_operation_*).

The operation label is the command's name, or the name of the gateway's Lua script an EVALSHA runs
(`ratelimit_reserve`, `state_history`, ...), so its values are bounded by the code, never by data.
Pipelines (`client.pipeline()`, used for conversation item reads) are not timed.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from policies.limiter import LUA_SHA
from policies.redis_pipe import RedisPipe

__all__ = ["Observe", "TimedRedis", "TimedRedisCluster", "TimedRedisPipe", "operation_name"]

Observe = Callable[[str, float, BaseException | None], None]
"""(operation, seconds, the exception when it failed)."""


def _script_names() -> dict[str, str]:
    names = {LUA_SHA: "ratelimit"}
    for entry in resources.files("gateway.state").joinpath("lua").iterdir():
        if entry.name.endswith(".lua"):
            names[hashlib.sha1(entry.read_text().encode()).hexdigest()] = "state_" + entry.name[:-4]
    return names


_SCRIPTS = _script_names()


def _text(v: Any) -> str:
    return v.decode("latin-1") if isinstance(v, bytes) else str(v)


def operation_name(args: tuple[Any, ...]) -> str:
    """`get`, `set`, `ratelimit_reserve`, `state_history`, `evalsha` for a script not the gateway's."""
    if not args:
        return "unknown"
    command = _text(args[0]).lower()
    if command not in ("evalsha", "eval") or len(args) < 3:
        return command
    name = _SCRIPTS.get(_text(args[1])) if command == "evalsha" else None
    if name is None:
        return command
    if name == "ratelimit":  # one script, two operations: its first argument says which
        try:
            mode = _text(args[3 + int(args[2])])
        except (IndexError, ValueError):
            return name
        return f"{name}_{mode}" if mode in ("reserve", "settle") else name
    return name


def _failure(exc: BaseException) -> BaseException | None:
    # EVALSHA of a script the server has not cached yet is how scripts are sent (the caller loads it and
    # runs it again): a round trip, not a failure.
    return None if isinstance(exc, NoScriptError) else exc


class _Timed:
    """`execute_command` reported to `observe` (None: not timed); mixed in before a Redis client class."""

    observe: Observe | None = None

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        observe = self.observe
        inner = super().execute_command  # type: ignore[misc]
        if observe is None:
            return await inner(*args, **kwargs)
        started = time.perf_counter()
        try:
            result = await inner(*args, **kwargs)
        except BaseException as exc:  # a cancelled wait (a timeout above) is a slow operation too
            observe(operation_name(args), time.perf_counter() - started, _failure(exc))
            raise
        observe(operation_name(args), time.perf_counter() - started, None)
        return result


class TimedRedis(_Timed, aioredis.Redis):  # type: ignore[misc]  # redis-py's own bases disagree
    """`redis.asyncio.Redis` whose `execute_command` reports each command to `observe`."""


class TimedRedisCluster(_Timed, RedisCluster):  # type: ignore[misc]
    """The same for a Redis Cluster."""


class TimedRedisPipe(RedisPipe):
    """The request path's pipelined connection, timed per command (the wait includes the loop turn
    the command is batched in: that is what a request waits)."""

    def __init__(self, client: aioredis.Redis, observe: Observe) -> None:
        super().__init__(client)
        self._observe = observe

    async def execute(self, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            result = await super().execute(*args)
        except BaseException as exc:  # a cancelled wait (a timeout above) is a slow operation too
            self._observe(operation_name(args), time.perf_counter() - started, _failure(exc))
            raise
        self._observe(operation_name(args), time.perf_counter() - started, None)
        return result
