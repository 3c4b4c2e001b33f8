"""Token rate limits shared by every gateway replica: one atomic Lua script per decision in Redis.

Reserve at admission, settle with real usage afterwards; while Redis is unreachable either a local
per-replica limiter takes over (fail-open) or requests are refused (fail-closed).
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from policies.bucket import KIND_NAMES, MemoryState, Scope, Verdict, decide, settle
from policies.config import Limits, RateLimitConfig, TenantConfig
from policies.errors import LimiterUnavailable, RateLimited
from policies.keys import ApiKey

__all__ = ["LUA_SOURCE", "Limiter", "Reservation", "format_duration", "ratelimit_headers"]

log = logging.getLogger("gravity.policies.limiter")

LUA_SOURCE = resources.files("policies").joinpath("ratelimit.lua").read_text()


@dataclass
class Reservation:
    """What admission took, so the finish hook can settle it where it was taken."""

    scopes: list[Scope]
    request_id: str
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
        self._script: Any = None
        self._local = MemoryState()
        self._redis_down_until = -math.inf
        self._local_scopes: dict[tuple[str, ...], list[Scope]] = {}
        self._scopes: dict[tuple[object, ...], list[Scope]] = {}

    def attach(self, client: Any) -> None:
        """Use this redis.asyncio client (or cluster); the script is sent once, then run by EVALSHA."""
        self._script = client.register_script(LUA_SOURCE) if client is not None else None

    async def warm(self, client: Any) -> None:
        """Load the script (on every primary of a cluster) and open connections before traffic,
        so the first decisions are not the ones to hit `redis_timeout_s`."""
        try:
            await client.script_load(LUA_SOURCE)
        except Exception as exc:  # noqa: BLE001 - an unreachable Redis at start is handled per request
            log.warning("rate limiter: could not load its script into Redis yet (%s)", type(exc).__name__)

    @property
    def redis_ok(self) -> bool:
        return self._script is not None and self.clock() >= self._redis_down_until

    def scopes(self, key: ApiKey, model: str) -> list[Scope]:
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

    async def reserve(self, key: ApiKey, model: str, request_id: str, tokens: int) -> Reservation | None:
        """Take `tokens` (and one request, one slot) from every budget, or raise `RateLimited`."""
        scopes = self.scopes(key, model)
        if not scopes:
            return None
        where = "local"
        verdict: Verdict | None = None
        if self.redis_ok:
            try:
                async with asyncio.timeout(self.cfg.redis_timeout_s):
                    reply = await self._script(keys=_keys(scopes), args=_args("reserve", request_id,
                                                                              self.cfg, tokens, 0, scopes))
                verdict, where = Verdict.from_reply(reply), "redis"
            except Exception as exc:  # noqa: BLE001 - any Redis failure takes the configured fallback
                self._redis_failed("reserve", exc)
        if verdict is None:
            if self.cfg.failure_mode == "closed":
                raise LimiterUnavailable("The rate limiter is unavailable; try again shortly.")
            scopes = self._shared(scopes)
            verdict = decide(self._local, scopes, self.clock() * 1000, request_id, tokens,
                             self.cfg.concurrency_lease_s * 1000)
        if not verdict.allowed:
            raise _refusal(verdict, scopes, model, tokens)
        return Reservation(scopes, request_id, tokens, verdict, where)

    async def settle(self, r: Reservation, actual: int) -> None:
        """Replace the reservation by the tokens really used (0 refunds it) and free the slot."""
        if r.where == "local":
            settle(self._local, r.scopes, self.clock() * 1000, r.request_id, r.reserved, actual)
            return
        if not self.redis_ok:
            # Lost: the tokens stay charged and the slot frees itself when its lease ends.
            return
        try:
            async with asyncio.timeout(self.cfg.redis_timeout_s):
                await self._script(keys=_keys(r.scopes),
                                   args=_args("settle", r.request_id, self.cfg, r.reserved, actual, r.scopes))
        except Exception as exc:  # noqa: BLE001
            self._redis_failed("settle", exc)

    def _redis_failed(self, op: str, exc: BaseException) -> None:
        if self.clock() >= self._redis_down_until:
            log.warning("rate limiter: Redis unreachable during %s (%s); %s for %.1fs", op,
                        type(exc).__name__ or "timeout",
                        "using the local limiter" if self.cfg.failure_mode == "open" else "refusing requests",
                        self.cfg.redis_retry_s)
        self._redis_down_until = self.clock() + self.cfg.redis_retry_s
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


def _args(mode: str, request_id: str, cfg: RateLimitConfig, reserved: int, actual: int,
          scopes: list[Scope]) -> list[str | int | float]:
    out: list[str | int | float] = [mode, "", request_id, int(cfg.concurrency_lease_s * 1000), reserved, actual]
    out.extend(s.packed_caps() for s in scopes)
    return out


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
                       retry_after=max(v.retry_after_ms, 1) / 1000, headers=headers)
