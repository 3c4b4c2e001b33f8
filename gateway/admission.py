"""The admission policies at the gateway's edge: auth, priority shedding, token rate limits.

Two steps, so the pipeline can send the reservation and the session lookup in one Redis round trip:
`authenticate` (local: keys are cached) then `reserve`; `finish` settles what `reserve` took.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from gateway.exchange import Exchange
from policies.auth import Authenticator
from policies.config import PoliciesConfig, Priority
from policies.errors import AdminRequired, LoadShed, PolicyError, RateLimited
from policies.estimate import TokenEstimator
from policies.keys import ApiKey, RedisKeyStore
from policies.limiter import Limiter, Reservation, ratelimit_headers
from policies.priority import EndpointLoad, resolve_priority, should_shed
from policies.redis_pipe import RedisPipe
from routing.types import evolve

__all__ = ["Admission"]

log = logging.getLogger("gravity.admission")

_EXTRAS = "admission"


class Admission:
    def __init__(self, cfg: PoliciesConfig, registry: CollectorRegistry,
                 endpoints: Callable[[], Iterable[EndpointLoad]], *, debug_headers: bool = False,
                 on_rate_limited: Callable[[str | None, str], None] = lambda scope, limit: None) -> None:
        self.cfg = cfg
        self._on_rate_limited = on_rate_limited
        """Told the scope and limit of every rate-limit refusal (gravity_ratelimit_rejections_total)."""
        self._endpoints = endpoints
        """The endpoints' current load, for shedding (the datastore's snapshot)."""
        self._debug = debug_headers
        self.rejections = Counter("gravity_admission_rejections", "Requests refused by admission policies.",
                                  ["code"], registry=registry)
        self.redis_errors = Counter(
            "gravity_ratelimit_redis_errors",
            "Rate-limiter calls that found Redis unreachable; the local limiter or a 503 answered instead.",
            ["op", "failure_mode"], registry=registry)
        self.auth = Authenticator(self.cfg.auth)
        self.limiter = Limiter(self.cfg.rate_limits, self.cfg.tenants, on_redis_error=self._count_redis_error)
        rl = self.cfg.rate_limits
        self.estimator = TokenEstimator(rl.estimator, rl.tiktoken_max_bytes)
        self._settler: asyncio.Task[None] | None = None

    def _count_redis_error(self, op: str, exc: BaseException) -> None:
        self.redis_errors.labels(op, self.cfg.rate_limits.failure_mode).inc()

    async def start(self, client: Any, pipe: RedisPipe | None = None) -> None:
        """Attach the Redis client (None: no Redis at all) and start the settlement batcher; `pipe` is the
        request path's shared pipelined connection."""
        if client is not None:
            if self.cfg.auth.enabled and self.cfg.auth.redis_keys:
                self.auth.store = RedisKeyStore(client)
            self.limiter.attach(client, pipe)
            if self.cfg.rate_limits.enabled:
                await self.limiter.warm(client)
                self._settler = asyncio.create_task(self.limiter.run_settler(), name="gravity-settler")
        if self._limited():
            self.estimator.load()

    def _limited(self) -> bool:
        """Whether any budget is configured at all (keys kept in Redis may carry their own)."""
        if not self.cfg.rate_limits.enabled:
            return False
        auth = self.cfg.auth
        return (any(not t.limits.is_empty() or t.models for t in self.cfg.tenants.values())
                or any(not k.limits.is_empty() for k in auth.keys) or (auth.enabled and auth.redis_keys))

    async def stop(self) -> None:
        if self._settler is not None:
            self._settler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._settler
            self._settler = None
        await self.limiter.close()  # queued settlements must reach Redis before it closes

    async def authorize_admin(self, headers: Mapping[str, str]) -> None:
        """Operator routes: with auth on, only keys marked `admin: true` (401 without a key, 403 with another)."""
        if not self.cfg.auth.enabled:
            return
        key = await self.auth.authenticate(headers)
        if not key.admin:
            raise AdminRequired("This route needs an admin API key (a key with admin: true).")

    async def identify(self, headers: Mapping[str, str]) -> str:
        """The API key's tenant (raising the same 401 as dispatching routes)."""
        return (await self.auth.authenticate(headers)).tenant

    async def authenticate(self, ex: Exchange, headers: Mapping[str, str]) -> ApiKey:
        """Who the request acts as; refuses bad keys, forbidden models, invalid priorities, shed load."""
        try:
            key = await self.auth.authenticate(headers)
            self.auth.check_model(key, ex.model)
            ex.tenant = key.tenant
            priority = resolve_priority(headers.get("x-gravity-priority"), key.priority, key.priority_cap)
            if priority == "sheddable" and self.cfg.priority.shed and should_shed(
                    priority, ex.model, self._endpoints(), self.cfg.priority):
                retry = self.cfg.priority.shed_retry_after_s
                raise LoadShed(f"Every backend for model '{ex.model}' is saturated and this request's priority "
                               f"is sheddable; try again in {retry:g}s.", retry_after=retry)
        except PolicyError as exc:
            self.rejections.labels(exc.code or "policy").inc()
            raise
        if priority != ex.routing.priority:
            ex.routing = evolve(ex.routing, priority=priority)
        return key

    async def reserve(self, ex: Exchange, key: ApiKey) -> None:
        """Take the request's tokens from every budget that applies (or raise `RateLimited`)."""
        try:
            if self.limiter.scopes(key, ex.model):
                prompt = ex.routing.prompt
                messages = prompt.count(b"\x1e") if ex.route == "chat/completions" else 0
                estimate = self.estimator.estimate(ex.model, prompt, messages)
                ex.routing = evolve(ex.routing, prompt_tokens=estimate.tokens)
                reservation = await self.limiter.reserve(key, ex.model, ex.request_id,
                                                         estimate.tokens + self._completion_budget(ex))
                if reservation is not None:
                    ex.extras[_EXTRAS] = (reservation, estimate)
                    ex.response_headers.update(ratelimit_headers(reservation.verdict))
                    if self._debug:
                        ex.response_headers["x-gravity-reserved-tokens"] = str(reservation.reserved)
            # else: no budget applies, so no token counting; routing keeps its bytes-based estimate.
        except PolicyError as exc:
            self.rejections.labels(exc.code or "policy").inc()
            if isinstance(exc, RateLimited):
                self._on_rate_limited(exc.scope, exc.limit)
            raise
        if self.cfg.priority.upstream and ex.route != "embeddings":
            priority: Priority = ex.routing.priority  # type: ignore[assignment]  # resolve_priority set it
            ex.replace_body({**ex.body, "priority": self.cfg.priority.upstream_values[priority]})
        elif "priority" in ex.body:
            # Only the gateway says what priority a backend sees: a client's own `priority` would
            # jump vLLM's queue past every policy here.
            ex.replace_body({k: v for k, v in ex.body.items() if k != "priority"})

    def _completion_budget(self, ex: Exchange) -> int:
        if ex.route == "embeddings":
            return 0
        n = ex.body.get("n")
        choices = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
        return (ex.routing.max_tokens or self.cfg.rate_limits.default_max_tokens) * choices

    def holds(self, ex: Exchange) -> bool:
        """True while `ex` holds a reservation that `finish` will settle from its usage."""
        return _EXTRAS in ex.extras

    async def finish(self, ex: Exchange) -> None:
        """Settle the reservation with the tokens really used (nothing for a failed request)."""
        held = ex.extras.pop(_EXTRAS, None)
        usage = ex.usage or {}
        prompt_used = usage.get("prompt_tokens")
        if held is None:
            return
        reservation, estimate = held
        assert isinstance(reservation, Reservation)
        if isinstance(prompt_used, int):
            self.estimator.observe(ex.model, estimate, prompt_used)
        await self.limiter.settle(reservation, _tokens_used(ex, reservation.reserved))


def _tokens_used(ex: Exchange, reserved: int) -> int:
    """What to charge: the backend's usage when it reported one, nothing for failed or abandoned
    requests, the reservation itself for a success that reported no usage."""
    usage = ex.usage
    if usage:
        total = usage.get("total_tokens")
        if isinstance(total, int):
            return total
        parts = [usage.get("prompt_tokens"), usage.get("completion_tokens")]
        if any(isinstance(p, int) for p in parts):
            return sum(p for p in parts if isinstance(p, int))
    return reserved if ex.outcome == "ok" else 0
