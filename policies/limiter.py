"""Token rate limits shared by every gateway replica: one atomic Lua script per decision in Redis.

Reserve at admission, settle with real usage afterwards (batched off the request path); while Redis
is unreachable either a local per-replica limiter takes over (fail-open) or requests are refused.
"""
from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError

from policies.bucket import KIND_NAMES, MemoryState, Scope, Verdict, decide, settle
from policies.config import Limits, RateLimitConfig, TenantConfig
from policies.errors import LimiterUnavailable, RateLimited
from policies.keys import ApiKey
from policies.redis_pipe import RedisPipe

__all__ = ["LUA_SOURCE", "Limiter", "Reservation", "format_duration", "ratelimit_headers"]

log = logging.getLogger("gravity.policies.limiter")

LUA_SOURCE = resources.files("policies").joinpath("ratelimit.lua").read_text()
LUA_SHA = hashlib.sha1(LUA_SOURCE.encode()).hexdigest()
SETTLE_BATCH_MAX = 512
"""Queued settlements that make the finish hook send them at once instead of waiting for the timer."""


@dataclass
class Reservation:
    """What admission took, so the finish hook can settle it where it was taken."""

    scopes: list[Scope]
    request_id: str
    """The request's id as the caller knows it (for logs only; it may be the client's)."""
    member: str
    """The concurrency slot's name: minted by the limiter, unique per reservation."""
    reserved: int
    verdict: Verdict
    where: str
    """"redis" or "local"."""


def format_duration(ms: int) -> str:
    """OpenAI's reset format: "20ms", "1.5s", "6m0s", "1h2m3s"."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    s = ms / 1000
    if s < 60:
        return f"{s:.3f}".rstrip("0").rstrip(".") + "s"
    whole = math.ceil(s)
    h, rest = divmod(whole, 3600)
    m, sec = divmod(rest, 60)
    return (f"{h}h" if h else "") + f"{m}m{sec}s"


def ratelimit_headers(v: Verdict) -> dict[str, str]:
    out: dict[str, str] = {}
    if v.limit_requests >= 0:
        out["x-ratelimit-limit-requests"] = str(v.limit_requests)
        out["x-ratelimit-remaining-requests"] = str(v.remaining_requests)
        out["x-ratelimit-reset-requests"] = format_duration(v.reset_requests_ms)
    if v.limit_tokens >= 0:
        out["x-ratelimit-limit-tokens"] = str(v.limit_tokens)
        out["x-ratelimit-remaining-tokens"] = str(v.remaining_tokens)
        out["x-ratelimit-reset-tokens"] = format_duration(v.reset_tokens_ms)
    return out


class Limiter:
    """Builds a request's scopes (key, tenant, tenant+model) and reserves/settles their budgets.

    Every Redis key of one decision carries the hash tag `{tenant}`, so the script runs unchanged on
    Redis Cluster; a tenant's budgets then live on one shard (see docs/policies.md).
    """

    def __init__(self, cfg: RateLimitConfig, tenants: dict[str, TenantConfig], *,
                 clock: Callable[[], float] = time.monotonic,
                 on_redis_error: Callable[[str, BaseException], None] | None = None) -> None:
        self.cfg = cfg
        self.tenants = tenants
        self.clock = clock
        self.on_redis_error = on_redis_error
        self._client: Any = None
        self._pipe: RedisPipe | None = None
        self._owns_pipe = True
        self._local = MemoryState()
        self._local_swept = -math.inf
        # A slot's member is never a caller's string: a repeated id would share one slot (ZADD of
        # an existing member takes none), and one settle would free them all. 64 random bits tell
        # replicas (and restarts) apart; the counter tells this limiter's reservations apart.
        self._member_prefix = os.urandom(8).hex()
        self._member_seq = itertools.count()
        self._redis_down_until = -math.inf
        self._local_scopes: dict[tuple[str, ...], list[Scope]] = {}
        self._scopes: dict[tuple[object, ...], list[Scope]] = {}
        # Settlements waiting for the next batch: by tenant hash tag, then by scope, in arrival order.
        self._pending: dict[str, dict[str, tuple[Scope, list[tuple[str, int, int]]]]] = {}
        self._pending_n = 0
        self._batching = False
        self._wake = asyncio.Event()

    def attach(self, client: Any, pipe: RedisPipe | None = None) -> None:
        """Use this redis.asyncio client (or cluster); the script is sent once, then run by EVALSHA.

        A plain Redis client lends its settings to one pipelined connection: `pipe` when the caller
        shares one (the gateway sends the session lookup on it in the same write), else the
        limiter's own; a cluster client routes each call by its keys' slot itself."""
        self._client = client
        self._owns_pipe = pipe is None
        self._pipe = pipe if pipe is not None else (RedisPipe(client) if RedisPipe.supports(client) else None)

    async def close(self) -> None:
        """Send what is queued, then close the limiter's own connection."""
        await self.flush()
        if self._pipe is not None and self._owns_pipe:
            await self._pipe.close()

    async def warm(self, client: Any) -> None:
        """Load the script (on every primary of a cluster) and open connections before traffic,
        so the first decisions are not the ones to hit `redis_timeout_s`."""
        try:
            await client.script_load(LUA_SOURCE)
        except Exception as exc:  # noqa: BLE001 - an unreachable Redis at start is handled per request
            log.warning("rate limiter: could not load its script into Redis yet (%s)", type(exc).__name__)

    @property
    def redis_ok(self) -> bool:
        return self._client is not None and self.clock() >= self._redis_down_until

    def scopes(self, key: ApiKey, model: str) -> list[Scope]:
        """The budgets a request of `key` for `model` is charged to (empty: no limit applies)."""
        if not self.cfg.enabled:
            return []
        ident = (key.tenant, key.sha256, model, key.limits)
        cached = self._scopes.get(ident)
        if cached is None:
            cached = self._build_scopes(key, model)
            if len(self._scopes) >= 10_000:
                self._scopes.clear()  # bounded: keys x models seen recently
            self._scopes[ident] = cached
        return cached

    def _build_scopes(self, key: ApiKey, model: str) -> list[Scope]:
        tag = f"{self.cfg.key_prefix}:{{{key.tenant}}}"
        out = []
        if key.sha256 and not key.limits.is_empty():
            out.append(Scope("key", f"{tag}:k:{key.id}", f"{tag}:k:{key.id}:c", key.limits))
        tenant = self.tenants.get(key.tenant)
        if tenant is not None:
            if not tenant.limits.is_empty():
                out.append(Scope("tenant", f"{tag}:t", f"{tag}:t:c", tenant.limits))
            per_model = tenant.models.get(model)
            if per_model is not None and not per_model.is_empty():
                out.append(Scope("tenant model", f"{tag}:m:{model}", f"{tag}:m:{model}:c", per_model))
        return out

    async def _run(self, keys: list[str], args: list[str | int]) -> Any:
        # EVALSHA itself, not redis-py's Script wrapper (~20 µs more per call); RedisCluster routes
        # it by the keys' slot, which the shared hash tag makes one.
        run = self._pipe.execute if self._pipe is not None else self._client.execute_command
        try:
            return await run("EVALSHA", LUA_SHA, len(keys), *keys, *args)
        except NoScriptError:  # a restarted or failed-over Redis lost its script cache
            await self._client.script_load(LUA_SOURCE)
            return await run("EVALSHA", LUA_SHA, len(keys), *keys, *args)

    async def reserve(self, key: ApiKey, model: str, request_id: str, tokens: int) -> Reservation | None:
        """Take `tokens` (and one request, one slot) from every budget, or raise `RateLimited`.

        `request_id` is only recorded: each reservation holds a slot of its own whatever it is."""
        scopes = self.scopes(key, model)
        if not scopes:
            return None
        member = f"{self._member_prefix}:{next(self._member_seq):x}"
        where = "local"
        verdict: Verdict | None = None
        if self.redis_ok:
            args: list[str | int] = ["reserve", "", member, int(self.cfg.concurrency_lease_s * 1000), tokens]
            args.extend(s.packed_caps for s in scopes)
            try:
                async with asyncio.timeout(self.cfg.redis_timeout_s):
                    reply = await self._run(_keys(scopes), args)
                verdict, where = Verdict.from_reply(reply), "redis"
            except Exception as exc:  # noqa: BLE001 - any Redis failure takes the configured fallback
                await self._redis_failed("reserve", exc)
        if verdict is None:
            if self.cfg.failure_mode == "closed":
                raise LimiterUnavailable("The rate limiter is unavailable; try again shortly.")
            scopes = self._shared(scopes)
            now = self.clock() * 1000
            if now - self._local_swept >= 1000:  # expired local buckets, as Redis would drop them
                self._local.sweep(now)
                self._local_swept = now
            verdict = decide(self._local, scopes, now, member, tokens, self.cfg.concurrency_lease_s * 1000)
        if not verdict.allowed:
            raise _refusal(verdict, scopes, model, tokens)
        return Reservation(scopes, request_id, member, tokens, verdict, where)

    async def settle(self, r: Reservation, actual: int) -> None:
        """Replace the reservation by the tokens really used (0 refunds it) and free the slot.

        A Redis reservation's settlement is queued for the next batch while `run_settler` runs
        (at most `settle_interval_ms` late), and sent at once otherwise.
        """
        if r.where == "local":
            settle(self._local, r.scopes, self.clock() * 1000, r.member, r.reserved, actual)
            return
        if not _changes_anything(r, actual):
            return
        tag = r.scopes[0].bucket_key.partition("}")[0]
        by_scope = self._pending.setdefault(tag, {})
        for s in r.scopes:
            entry = by_scope.get(s.bucket_key)
            if entry is None:
                entry = by_scope[s.bucket_key] = (s, [])
            entry[1].append((r.member, r.reserved, actual))
        self._pending_n += 1
        # A concurrency slot is freed at once: a client that waits for its answer before sending the
        # next request must find its slot free (batching only ever delays token refunds).
        holds_slot = any(s.limits.concurrency for s in r.scopes)
        if not self._batching or holds_slot or self._pending_n >= SETTLE_BATCH_MAX:
            await self.flush()
        else:
            self._wake.set()

    async def flush(self) -> None:
        """Send every queued settlement now: one script call per tenant (hash tag)."""
        pending, self._pending, self._pending_n = self._pending, {}, 0
        if not pending:
            return
        if not self.redis_ok:
            # Lost: the tokens stay charged and the slots free themselves when their leases end.
            return
        try:
            async with asyncio.timeout(self.cfg.redis_timeout_s):
                if len(pending) == 1:
                    for by_scope in pending.values():
                        await self._run(*_settle_call(by_scope))
                else:
                    await asyncio.gather(*(self._run(*_settle_call(b)) for b in pending.values()))
        except Exception as exc:  # noqa: BLE001
            await self._redis_failed("settle", exc)

    async def run_settler(self) -> None:
        """Batch settlements until cancelled (a lifespan task); the caller flushes after cancelling."""
        interval = self.cfg.settle_interval_ms / 1000
        if interval <= 0:
            return
        self._batching = True
        try:
            while True:
                await self._wake.wait()
                await asyncio.sleep(interval)
                self._wake.clear()
                await self.flush()
        finally:
            self._batching = False

    async def _redis_failed(self, op: str, exc: BaseException) -> None:
        if self.clock() >= self._redis_down_until:
            log.warning("rate limiter: Redis unreachable during %s (%s); %s for %.1fs", op,
                        type(exc).__name__ or "timeout",
                        "using the local limiter" if self.cfg.failure_mode == "open" else "refusing requests",
                        self.cfg.redis_retry_s)
        self._redis_down_until = self.clock() + self.cfg.redis_retry_s
        if self._pipe is not None:
            await self._pipe.reset()  # a reply may still be owed on it: start the next try afresh
        if self.on_redis_error is not None:
            self.on_redis_error(op, exc)

    def _shared(self, scopes: list[Scope]) -> list[Scope]:
        """The scopes with each limit scaled to this replica's share of it."""
        share = self.cfg.local_share
        if share >= 1:
            return scopes
        ident = tuple(s.bucket_key for s in scopes)
        cached = self._local_scopes.get(ident)
        if cached is None:
            cached = [Scope(s.label, s.bucket_key, s.slots_key, _scaled(s.limits, share)) for s in scopes]
            self._local_scopes[ident] = cached
        return cached


def _scaled(lim: Limits, share: float) -> Limits:
    def f(v: int | None) -> int | None:
        return None if v is None else max(1, math.floor(v * share))
    return Limits(tpm=f(lim.tpm), rpm=f(lim.rpm), tpd=f(lim.tpd), concurrency=f(lim.concurrency))


def _keys(scopes: list[Scope]) -> list[str]:
    return [k for s in scopes for k in (s.bucket_key, s.slots_key)]


def _changes_anything(r: Reservation, actual: int) -> bool:
    """False when settling would leave every bucket as it is and hold no slot: nothing to send."""
    for s in r.scopes:
        lim = s.limits
        if lim.concurrency or any(cap and min(r.reserved, cap) != actual for cap in (lim.tpm, lim.tpd)):
            return True
    return False


def _settle_call(by_scope: dict[str, tuple[Scope, list[tuple[str, int, int]]]]) -> tuple[list[str], list[str | int]]:
    keys: list[str] = []
    args: list[str | int] = ["settle", ""]
    for scope, entries in by_scope.values():
        keys += (scope.bucket_key, scope.slots_key)
        args += (scope.packed_caps, len(entries))
        for rid, reserved, actual in entries:
            args += (rid, reserved, actual)
    return keys, args


_LIMIT_LABELS = {"t": "tpm", "r": "rpm", "d": "tpd", "c": "concurrency"}


def _refusal(v: Verdict, scopes: list[Scope], model: str, tokens: int) -> RateLimited:
    scope = scopes[v.failed_scope] if 0 <= v.failed_scope < len(scopes) else None
    what = KIND_NAMES.get(v.failed_kind, "limit")
    holder = {"key": "this API key", "tenant": "your organization",
              "tenant model": f"your organization on model {model}"}.get(scope.label if scope else "", "you")
    detail = f" Requested {tokens} tokens." if v.failed_kind in ("t", "d") else ""
    headers = ratelimit_headers(v)
    headers["retry-after-ms"] = str(max(v.retry_after_ms, 1))
    return RateLimited(f"Rate limit reached for {holder} on {what}.{detail} Please try again in "
                       f"{format_duration(v.retry_after_ms)}.",
                       kind="requests" if v.failed_kind in ("r", "c") else "tokens",
                       retry_after=max(v.retry_after_ms, 1) / 1000, headers=headers,
                       scope=scope.label if scope else None,
                       limit=_LIMIT_LABELS.get(v.failed_kind, ""))
