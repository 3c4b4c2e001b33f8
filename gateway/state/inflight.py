"""In-flight counts shared between gateway replicas through Redis (ADR 0007, docs/state.md).

Each replica writes its own (requests, prompt tokens awaiting prefill) per endpoint into one hash, as
absolute values under fields of its own, fire-and-forget on the pipelined connection whenever they
change; it reads the other live replicas' sums in the request's one pre-dispatch Redis call.
A replica that stops refreshing its liveness field (killed) is ignored and its fields removed after
`ttl_s`; every field is rewritten each `heartbeat_s`, so a restarted Redis is whole again by then.
Redis unreachable: route on this replica's own counts (fail-open), counted and logged once.

With a precise prefix scorer, the same calls also carry its *pending marks* (routing/kv/pending.py):
each pick's blocks the engine does not hold yet go into one capped Redis stream next to the hash (same
hash tag), written with the counts, and the read brings back the other replicas' newest marks.
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
from routing.kv.pending import ForeignMark, PendingExchange, pack_keys, unpack_keys

__all__ = ["MARK_LUA", "PUBLISH_LUA", "READ_LUA", "SharedInflight"]

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

# KEYS[1]: the stream of pending marks; ARGV: replica, ttl ms, max entries, then (endpoint, packed keys) pairs.
MARK_LUA = _NOW + """
local key, id, ttl, cap = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3]
for i = 4, #ARGV, 2 do
  redis.call('XADD', key, 'MAXLEN', '~', cap, '*', 'r', id, 'e', ARGV[i], 'k', ARGV[i + 1])
end
redis.call('XTRIM', key, 'MINID', '~', now - ttl)
redis.call('PEXPIRE', key, ttl)
return 1
"""

# KEYS[2], ARGV[2], ARGV[3]: the marks' stream, the last entry id this replica read ('' if none), how many
# of the newest entries past it to return (0: none). Reply: present, others, last id, n marks,
# n x (age ms, endpoint, packed keys), then (endpoint, requests, tokens) triples.
READ_LUA = _NOW + """
local key, me = KEYS[1], ARGV[1]
local last, count, marks = ARGV[2], tonumber(ARGV[3]), {}
if count > 0 then
  local got = redis.call('XREVRANGE', KEYS[2], '+', last == '' and '-' or '(' .. last, 'COUNT', count)
  if #got > 0 then last = got[1][1] end
  for _, entry in ipairs(got) do
    local f = entry[2]
    if f[2] ~= me then
      marks[#marks + 1] = now - tonumber(string.match(entry[1], '^(%d+)'))
      marks[#marks + 1] = f[4] marks[#marks + 1] = f[6]
    end
  end
end
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
local out = {alive[me] and 1 or 0, others, last, #marks / 3}
for _, m in ipairs(marks) do out[#out + 1] = m end
for _, ep in ipairs(order) do
  out[#out + 1] = ep out[#out + 1] = sums[ep][1] out[#out + 1] = sums[ep][2]
end
return out
"""

_PUBLISH_SHA = hashlib.sha1(PUBLISH_LUA.encode()).hexdigest()
_READ_SHA = hashlib.sha1(READ_LUA.encode()).hexdigest()
_MARK_SHA = hashlib.sha1(MARK_LUA.encode()).hexdigest()


class SharedInflight:
    """Publishes the datastore's own in-flight counts and feeds it the other replicas' (`refresh`)."""

    def __init__(self, datastore: Datastore, cfg: SharedInflightConfig, registry: CollectorRegistry,
                 pipe: Callable[[], RedisPipe | None], client: Callable[[], Any],
                 clock: Callable[[], float] = time.monotonic, pending: PendingExchange | None = None) -> None:
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
        self._marks_key = cfg.key + ":pending"  # the same hash tag: one slot with the counts on Redis Cluster
        self._last_mark = ""
        self._reload_marks = False
        self._pending = pending if cfg.pending else None
        if self._pending is not None:
            self._pending.max_blocks = cfg.pending_max_blocks
            self._pending.attach(self._schedule)
        self.marks = Counter("gravity_shared_pending_marks",
                             "Pending marks (blocks sent to an engine not yet reported) shared with other replicas.",
                             ["direction"], registry=registry)

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        with contextlib.suppress(Exception):
            await self._client().script_load(PUBLISH_LUA)
            await self._client().script_load(READ_LUA)
            await self._client().script_load(MARK_LUA)
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
                await self._eval(_PUBLISH_SHA, PUBLISH_LUA, (self.cfg.key,), self.replica, "0", "1")

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
        if self._dirty or self._full:
            names = [s.name for s in self._ds.specs()] if self._full else sorted(self._dirty)
            self._dirty.clear()
            self._fire(_PUBLISH_SHA, PUBLISH_LUA, (self.cfg.key,), self._args(names), counts=True)
        marks = self._pending.take() if self._pending is not None else []
        if marks:
            args = [self.replica, str(max(1, int(self.cfg.pending_ttl_s * 1000))), str(self.cfg.pending_max_entries)]
            for endpoint, keys in marks:
                args += (endpoint, pack_keys(keys))  # type: ignore[arg-type]
            self.marks.labels("sent").inc(len(marks))
            self._fire(_MARK_SHA, MARK_LUA, (self._marks_key,), args, counts=False)

    def _fire(self, sha: str, source: str, keys: tuple[str, ...], args: list[Any], *, counts: bool) -> None:
        """Send without waiting. A lost count write is healed by a full rewrite; a lost mark is only a hint."""
        pipe = self._pipe()
        if pipe is None:  # Redis Cluster: its client routes the call; still off the request's path
            task = asyncio.create_task(self._send(sha, source, keys, args, counts))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
            if counts:
                self._full = False
            return
        fut = pipe.send_nowait("EVALSHA", sha, len(keys), *keys, *args)
        if fut is None:  # not connected: the next read or heartbeat reconnects, then everything is rewritten
            if counts:
                self._full = True
            return
        pipe.write_now()  # other replicas see the change one loop turn sooner
        if counts:
            self._full = False
        fut.add_done_callback(self._written if counts else self._mark_written)

    async def _send(self, sha: str, source: str, keys: tuple[str, ...], args: list[Any], counts: bool) -> None:
        try:
            async with asyncio.timeout(self.cfg.timeout_s):
                await self._eval(sha, source, keys, *args)
        except Exception as exc:  # noqa: BLE001 - counts are rewritten in full by the next write
            if counts:
                self._full = True
            self.errors.labels("write" if counts else "marks").inc()
            self._trouble("write", exc)

    def _mark_written(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            self.errors.labels("marks").inc()
            self._reload_marks = True  # a restarted Redis lost the script: the next heartbeat loads it

    def _written(self, fut: asyncio.Future[Any]) -> None:
        exc = None if fut.cancelled() else fut.exception()
        if fut.cancelled() or exc is not None:
            self._full = True  # what was lost is rewritten with the next write
            self.errors.labels("write").inc()
            self._trouble("write", exc)

    async def _publish_full(self) -> None:
        self._full = True
        try:
            if self._reload_marks:
                self._reload_marks = False
                async with asyncio.timeout(self.cfg.timeout_s):
                    await self._client().script_load(MARK_LUA)
            async with asyncio.timeout(self.cfg.timeout_s):
                await self._eval(_PUBLISH_SHA, PUBLISH_LUA, (self.cfg.key,),
                                 *self._args([s.name for s in self._ds.specs()]))
            self._full = False
        except Exception as exc:  # noqa: BLE001 - an outage: the heartbeat tries again
            self.errors.labels("write").inc()
            self._trouble("write", exc)

    async def _eval(self, sha: str, source: str, keys: tuple[str, ...], *args: Any) -> Any:
        pipe = self._pipe()
        run = pipe.execute if pipe is not None else self._client().execute_command
        try:
            return await run("EVALSHA", sha, len(keys), *keys, *args)
        except NoScriptError:  # a restarted Redis lost its script cache
            await self._client().script_load(source)
            return await run("EVALSHA", sha, len(keys), *keys, *args)

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
                reply = await self._eval(_READ_SHA, READ_LUA, (self.cfg.key, self._marks_key), self.replica,
                                         self._last_mark, str(self.cfg.pending_read_count if self._pending else 0))
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
        last = reply[2]
        self._last_mark = last.decode() if isinstance(last, bytes) else str(last)
        n = int(reply[3])
        if n and self._pending is not None:
            self._pending.deliver([ForeignMark(_text(reply[i + 1]), unpack_keys(reply[i + 2]), int(reply[i]) / 1000)
                                   for i in range(4, 4 + 3 * n, 3)])
            self.marks.labels("received").inc(n)
        counts: dict[str, tuple[int, int]] = {}
        for i in range(4 + 3 * n, len(reply) - 2, 3):
            name = _text(reply[i])
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


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
