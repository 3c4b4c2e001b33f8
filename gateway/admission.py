"""Wire the admission policies into the gateway: auth, priority shedding, token rate limits.

`install_admission(gw)` registers one pre-dispatch hook, one finish hook and one lifecycle part.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import orjson
from prometheus_client import Counter

from gateway.exchange import Exchange
from policies.auth import Authenticator
from policies.config import PoliciesConfig
from policies.errors import LoadShed, PolicyError
from policies.estimate import TokenEstimator
from policies.keys import RedisKeyStore
from policies.limiter import Limiter, Reservation, ratelimit_headers
from policies.priority import resolve_priority, should_shed

if TYPE_CHECKING:
    from gateway.services import Gateway

__all__ = ["Admission", "install_admission"]

log = logging.getLogger("gravity.admission")

_EXTRAS = "admission"


class Admission:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.cfg: PoliciesConfig = gw.cfg.policies
        registry = gw.metrics.registry
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

    async def start(self) -> None:
        client = self.gw.redis.client if self.gw.redis is not None else None
        if client is not None:
            if self.cfg.auth.enabled and self.cfg.auth.redis_keys:
                self.auth.store = RedisKeyStore(client)
            self.limiter.attach(client)
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

    async def identify(self, headers: Mapping[str, str]) -> str:
        """The API key's tenant (raising the same 401 as dispatching routes)."""
        return (await self.auth.authenticate(headers)).tenant

    async def before_dispatch(self, ex: Exchange, headers: Mapping[str, str]) -> None:
        try:
            await self._admit(ex, headers)
        except PolicyError as exc:
            self.rejections.labels(exc.code or "policy").inc()
            raise

    async def _admit(self, ex: Exchange, headers: Mapping[str, str]) -> None:
        key = await self.auth.authenticate(headers)
        self.auth.check_model(key, ex.model)
        ex.tenant = key.tenant
        priority = resolve_priority(headers.get("x-gravity-priority"), key.priority, key.priority_cap)
        if priority == "sheddable" and self.cfg.priority.shed and should_shed(
                priority, ex.model, self.gw.datastore.snapshot(), self.cfg.priority):
            retry = self.cfg.priority.shed_retry_after_s
            raise LoadShed(f"Every backend for model '{ex.model}' is saturated and this request's priority "
                           f"is sheddable; try again in {retry:g}s.", retry_after=retry)
        if not self.limiter.scopes(key, ex.model):
            # No budget applies: nothing to reserve, so no token counting; routing keeps its
            # bytes-based estimate of the prompt.
            if priority != ex.routing.priority:
                ex.routing = dataclasses.replace(ex.routing, priority=priority)
        else:
            prompt = ex.routing.prompt
            messages = prompt.count(b"\x1e") if ex.route == "chat/completions" else 0
            estimate = self.estimator.estimate(ex.model, prompt, messages)
            ex.routing = dataclasses.replace(ex.routing, priority=priority, prompt_tokens=estimate.tokens)
            reservation = await self.limiter.reserve(key, ex.model, ex.request_id,
                                                     estimate.tokens + self._completion_budget(ex))
            if reservation is not None:
                ex.extras[_EXTRAS] = (reservation, estimate)
                ex.response_headers.update(ratelimit_headers(reservation.verdict))
                if self.gw.cfg.server.debug_headers:
                    ex.response_headers["x-gravity-reserved-tokens"] = str(reservation.reserved)
        # Only the gateway says what priority a backend sees: its own value, or none at all (a
        # client's `priority` would jump vLLM's queue past every policy here).
        if self.cfg.priority.upstream and ex.route != "embeddings":
            ex.body = {**ex.body, "priority": self.cfg.priority.upstream_values[priority]}
            # upstream_body() forwards ex.raw untouched for non-stream requests: keep them in step.
            ex.raw = orjson.dumps(ex.body)
        elif "priority" in ex.body:
            ex.body = {k: v for k, v in ex.body.items() if k != "priority"}
            ex.raw = orjson.dumps(ex.body)

    def _completion_budget(self, ex: Exchange) -> int:
        if ex.route == "embeddings":
            return 0
        n = ex.body.get("n")
        choices = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
        return (ex.routing.max_tokens or self.cfg.rate_limits.default_max_tokens) * choices

    async def finish(self, ex: Exchange) -> None:
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


def install_admission(gw: Gateway) -> Admission:
    admission = Admission(gw)
    gw.pre_dispatch_hooks.append(admission.before_dispatch)
    gw.identify = admission.identify
    gw.finish_hooks.append(admission.finish)
    gw.lifecycle.append(admission)
    return admission
