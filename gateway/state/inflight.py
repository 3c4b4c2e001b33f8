"""In-flight counts shared between gateway replicas through Redis (ADR 0007, docs/state.md).

Each replica writes its own (requests, prompt tokens awaiting prefill) per endpoint into one hash, as
absolute values under fields of its own, fire-and-forget on the pipelined connection whenever they
change; it reads the other live replicas' sums in the request's one pre-dispatch Redis call.
A replica that stops refreshing its liveness field (killed) is ignored and its fields removed after
`ttl_s`; every field is rewritten each `heartbeat_s`, so a restarted Redis is whole again by then.
Redis unreachable: route on this replica's own counts (fail-open), counted and logged once.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.exceptions import NoScriptError

from gateway.config import SharedInflightConfig
from policies.redis_pipe import RedisPipe
from routing.datastore import Datastore

__all__ = ["PUBLISH_LUA", "READ_LUA", "SharedInflight"]

log = logging.getLogger("gravity.state")

# Fields of KEYS[1]: "<replica>" -> the ms (Redis clock) until which it is alive;
# "<replica>|<endpoint>" -> "<requests> <prompt tokens>". A replica id never contains "|".
_NOW = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)\n"

PUBLISH_LUA = _NOW + """
local key, id, ttl = KEYS[1], ARGV[1], tonumber(ARGV[2])
if ARGV[3] == '1' then  -- full rewrite: drop this replica's endpoints first
  local p = id .. '|'
  for _, f in ipairs(redis.call('HKEYS', key)) do
    if string.sub(f, 1, #p) == p then redis.call('HDEL', key, f) end
  end
end
for i = 4, #ARGV, 3 do
  local f = id .. '|' .. ARGV[i]
  if ARGV[i + 1] == '0' and ARGV[i + 2] == '0' then redis.call('HDEL', key, f)
  else redis.call('HSET', key, f, ARGV[i + 1] .. ' ' .. ARGV[i + 2]) end
end
if ttl == 0 then redis.call('HDEL', key, id) return 0 end  -- leaving
redis.call('HSET', key, id, now + ttl)
if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
return 1
"""

READ_LUA = _NOW + """
local key, me = KEYS[1], ARGV[1]
local all = redis.call('HGETALL', key)
local alive, others, sums, order = {}, 0, {}, {}
for i = 1, #all, 2 do
  local f = all[i]
  if not string.find(f, '|', 1, true) then
    if tonumber(all[i + 1]) >= now then
      alive[f] = true
      if f ~= me then others = others + 1 end
    else redis.call('HDEL', key, f) end
  end
end
for i = 1, #all, 2 do
  local f = all[i]
  local bar = string.find(f, '|', 1, true)
  if bar then
    local id = string.sub(f, 1, bar - 1)
    if not alive[id] then redis.call('HDEL', key, f)
    elseif id ~= me then
      local ep = string.sub(f, bar + 1)
      local n, tk = string.match(all[i + 1], '(%d+) (%d+)')
      local s = sums[ep]
      if not s then s = {0, 0} sums[ep] = s order[#order + 1] = ep end
      s[1] = s[1] + tonumber(n) s[2] = s[2] + tonumber(tk)
    end
  end
end
local out = {alive[me] and 1 or 0, others}
for _, ep in ipairs(order) do
  out[#out + 1] = ep out[#out + 1] = sums[ep][1] out[#out + 1] = sums[ep][2]
end
return out
"""

_PUBLISH_SHA = hashlib.sha1(PUBLISH_LUA.encode()).hexdigest()
_READ_SHA = hashlib.sha1(READ_LUA.encode()).hexdigest()


class SharedInflight:
    """Publishes the datastore's own in-flight counts and feeds it the other replicas' (`refresh`)."""

    def __init__(self, datastore: Datastore, cfg: SharedInflightConfig, registry: CollectorRegistry,
                 pipe: Callable[[], RedisPipe | None], client: Callable[[], Any],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ds = datastore
        self.cfg = cfg
        self._pipe = pipe
        self._client = client
        self._clock = clock
        self.replica = os.urandom(8).hex()
        self._ttl_ms = str(max(1, int(cfg.ttl_s * 1000)))
        self._dirty: set[str] = set()
        self._flushing = False
        self._full = True  # the next write rewrites every endpoint (start, after trouble)
        self._down_until = -math.inf
        self._warned = False
        self._sharing: list[asyncio.Future[None]] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._repair: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self.errors = Counter("gravity_shared_inflight_errors",
                              "Shared in-flight count reads and writes that failed; routing used own counts.",
                              ["op"], registry=registry)
        self.replicas = Gauge("gravity_shared_inflight_replicas",
                              "Other live gateway replicas whose in-flight counts the last read summed.",
                              registry=registry)
        datastore.add_inflight_listener(self._changed)

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        with contextlib.suppress(Exception):
            await self._client().script_load(PUBLISH_LUA)
            await self._client().script_load(READ_LUA)
        await self._publish_full()
        self._heartbeat = asyncio.create_task(self._beat(), name="gravity-shared-inflight")

    async def stop(self) -> None:
        for task in (self._heartbeat, self._repair):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._heartbeat = self._repair = None
        # Leaving cleanly: the others stop counting this replica at once, not after ttl_s.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.cfg.timeout_s):
                await self._eval(_PUBLISH_SHA, PUBLISH_LUA, self.replica, "0", "1")

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat_s)
            await self._publish_full()

    # -- writes: fire and forget, coalesced per loop turn ------------------------------------------
    def _changed(self, endpoint: str) -> None:
        self._dirty.add(endpoint)
        self._schedule()

    def _schedule(self) -> None:
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _args(self, names: list[str]) -> list[str]:
        args = [self.replica, self._ttl_ms, "1" if self._full else "0"]
        for name in names:
            n, tokens = self._ds.own_inflight(name)
            args += (name, str(n), str(tokens))
        return args

    def _flush(self) -> None:
        self._flushing = False
        names = [s.name for s in self._ds.specs()] if self._full else sorted(self._dirty)
        self._dirty.clear()
        args = self._args(names)
        pipe = self._pipe()
        if pipe is None:  # Redis Cluster: its client routes the call; still off the request's path
            task = asyncio.create_task(self._send(args))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
            self._full = False
            return
        fut = pipe.send_nowait("EVALSHA", _PUBLISH_SHA, 1, self.cfg.key, *args)
        if fut is None:  # not connected: the next read or heartbeat reconnects, then everything is rewritten
            self._full = True
            return
        pipe.write_now()  # other replicas see the change one loop turn sooner
        self._full = False
        fut.add_done_callback(self._written)

    async def _send(self, args: list[str]) -> None:
        try:
            async with asyncio.timeout(self.cfg.timeout_s):
                await self._eval(_PUBLISH_SHA, PUBLISH_LUA, *args)
        except Exception as exc:  # noqa: BLE001 - rewritten in full by the next write
            self._full = True
            self.errors.labels("write").inc()
            self._trouble("write", exc)

    def _written(self, fut: asyncio.Future[Any]) -> None:
        exc = None if fut.cancelled() else fut.exception()
        if fut.cancelled() or exc is not None:
            self._full = True  # what was lost is rewritten with the next write
            self.errors.labels("write").inc()
            self._trouble("write", exc)

    async def _publish_full(self) -> None:
        self._full = True
        try:
            async with asyncio.timeout(self.cfg.timeout_s):
                await self._eval(_PUBLISH_SHA, PUBLISH_LUA, *self._args([s.name for s in self._ds.specs()]))
            self._full = False
        except Exception as exc:  # noqa: BLE001 - an outage: the heartbeat tries again
            self.errors.labels("write").inc()
            self._trouble("write", exc)

    async def _eval(self, sha: str, source: str, *args: str) -> Any:
        pipe = self._pipe()
        run = pipe.execute if pipe is not None else self._client().execute_command
        try:
            return await run("EVALSHA", sha, 1, self.cfg.key, *args)
        except NoScriptError:  # a restarted Redis lost its script cache
            await self._client().script_load(source)
            return await run("EVALSHA", sha, 1, self.cfg.key, *args)

    # -- reads: in the request's pre-dispatch Redis call -------------------------------------------
    async def refresh(self) -> None:
        """Read the other replicas' counts into the datastore. Call it where the request's other Redis
        commands are sent, so it leaves in the same write; concurrent callers share one read."""
        if self._clock() < self._down_until:
            return
        if self._sharing is not None:  # a read already left: its answer is as fresh as a new one's
            fut = asyncio.get_running_loop().create_future()
            self._sharing.append(fut)
            await fut
            return
        waiters: list[asyncio.Future[None]] = []
        self._sharing = waiters
        try:
            async with asyncio.timeout(self.cfg.timeout_s):
                reply = await self._eval(_READ_SHA, READ_LUA, self.replica)
            self._apply(reply)
        except Exception as exc:  # noqa: BLE001 - fail-open: own counts only
            self._ds.set_foreign_inflight({})
            self._down_until = self._clock() + self.cfg.retry_after_s
            self._full = True
            self.errors.labels("read").inc()
            self._trouble("read", exc)
        finally:
            self._sharing = None
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    def _apply(self, reply: Any) -> None:
        present, others = int(reply[0]), int(reply[1])
        counts: dict[str, tuple[int, int]] = {}
        for i in range(2, len(reply) - 2, 3):
            name = reply[i].decode() if isinstance(reply[i], bytes) else str(reply[i])
            counts[name] = (int(reply[i + 1]), int(reply[i + 2]))
        self._ds.set_foreign_inflight(counts)
        self.replicas.set(others)
        if self._warned:
            self._warned = False
            log.info("shared in-flight counts are back: routing on every replica's counts again")
        if not present and self._repair is None:
            # Redis restarted (scripts gone too) or our fields expired: write everything again now.
            self._repair = asyncio.create_task(self._publish_full(), name="gravity-shared-inflight-repair")
            self._repair.add_done_callback(self._repaired)

    def _repaired(self, task: asyncio.Task[None]) -> None:
        self._repair = None

    def _trouble(self, op: str, exc: BaseException | None) -> None:
        if not self._warned:
            self._warned = True
            log.warning("shared in-flight counts unavailable (%s: %s): routing on this replica's own counts",
                        op, type(exc).__name__ if exc is not None else "cancelled")
