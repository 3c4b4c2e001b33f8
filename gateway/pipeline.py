"""The request pipeline every way in shares: build the exchange, admit it, route it, finish it once.

The proxy routes, the Responses API and the ext_proc sidecar all call these steps, so auth, budgets,
session affinity and the scheduler have one implementation. `finish` is idempotent: whatever path
a request takes after admission (an error, a 409, a disconnect), its reservation is settled or
refunded exactly once.
"""
from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Mapping

from gateway.admission import Admission
from gateway.errors import to_gateway_error
from gateway.exchange import Exchange
from gateway.logs import AccessLog
from gateway.metrics import GatewayMetrics
from gateway.openai_requests import ParsedBody
from gateway.state.inflight import SharedInflight
from gateway.state.sessions import SessionAffinity
from gateway.telemetry import NOOP, Tracing
from gateway.telemetry import names as spans
from policies.circuit import CircuitBoard
from policies.errors import ProfileNotAllowed
from policies.keys import ApiKey
from policies.resilience import ResilienceConfig
from routing.datastore import Datastore
from routing.errors import NoHealthyEndpoint, UnknownProfile
from routing.scheduler import Scheduler
from routing.types import RoutingRequest, evolve

log = logging.getLogger("gravity")

__all__ = ["Pipeline"]


class Pipeline:
    def __init__(self, admission: Admission, sessions: SessionAffinity, scheduler: Scheduler, datastore: Datastore,
                 metrics: GatewayMetrics, resilience: ResilienceConfig, *, session_from_user: bool,
                 circuits: CircuitBoard | None = None, tracing: Tracing = NOOP,
                 access: AccessLog | None = None, shared_inflight: SharedInflight | None = None) -> None:
        self.admission = admission
        self.access = access
        self.datastore = datastore
        self.sessions = sessions
        self.scheduler = scheduler
        self.metrics = metrics
        self._resilience = resilience
        self._session_from_user = session_from_user
        self._circuits = circuits
        self._tracing = tracing
        self.shared_inflight = shared_inflight
        """Other gateway replicas' in-flight counts, read in the same write as the budgets (docs/state.md)."""

    # -- before dispatch ----------------------------------------------------------------------------
    def exchange(self, route: str, parsed: ParsedBody, raw: bytes, headers: Mapping[str, str], request_id: str,
                 forward_headers: dict[str, str], client_request_id: str | None = None) -> Exchange:
        session_id = headers.get("x-session-id") or (parsed.user if self._session_from_user else None)
        model, lora = self.routing_model(parsed.model)
        routing_req = RoutingRequest(
            model=model, lora=lora, prompt=parsed.prompt, session_id=session_id, cache_salt=parsed.cache_salt,
            # bytes/4 is the cheap estimate; admission may replace it with a measured count.
            prompt_tokens=len(parsed.prompt) // 4, max_tokens=parsed.max_tokens,
            priority="standard", request_id=request_id, route=route, body=parsed.body,
        )
        forward_headers["x-request-id"] = request_id
        ex = Exchange(request_id=request_id, route=route, model=parsed.model, body=parsed.body, raw=raw,
                      stream=parsed.stream, client_wants_usage=parsed.wants_usage, routing=routing_req,
                      forward_headers=forward_headers, client_request_id=client_request_id)
        resume = self._resilience.resume
        if parsed.stream and resume.enabled and resume.pin_seed and route != "embeddings":
            seed = parsed.body.get("seed")
            if not isinstance(seed, int) or isinstance(seed, bool):
                # From the gateway's own id: the same on every attempt, unrelated across requests.
                ex.pin_seed = zlib.crc32(request_id.encode()) & 0x7FFFFFFF
        return ex

    def routing_model(self, model: str) -> tuple[str, str | None]:
        """(model, adapter) to route on: a LoRA adapter's name routes as its base model with ``lora`` set,
        so LoRA filtering and affinity apply; the body upstream keeps the adapter's name (vLLM's way)."""
        base = self.datastore.adapter_base(model)
        return (model, None) if base is None else (base, model)

    async def authenticate(self, ex: Exchange, headers: Mapping[str, str]) -> ApiKey:
        with self._tracing.span(spans.SPAN_AUTH) as span:
            key = await self.admission.authenticate(ex, headers)
            ex.key_name = key.name
            profile = headers.get("x-gravity-profile")
            if profile:
                # Only keys whose `profiles:` list names it may pick a profile: the baselines can be far worse
                # for everyone sharing the fleet, so choosing is an operator's grant, refused loudly (403).
                if not key.may_choose_profile(profile):
                    raise ProfileNotAllowed(profile)
                if profile not in self.scheduler.profiles:
                    raise UnknownProfile(profile)
                ex.routing = evolve(ex.routing, profile=profile)
            self._tracing.authenticated(span, ex, key)
        return key

    async def reserve(self, ex: Exchange, key: ApiKey) -> None:
        """Budgets, the session's endpoint and the other replicas' in-flight counts together: their
        commands leave in one write (one round trip)."""
        with self._tracing.span(spans.SPAN_RATE_LIMIT) as span:
            try:
                shared = self.shared_inflight
                if ex.routing.session_id:
                    await asyncio.gather(self.admission.reserve(ex, key), self.sessions.lookup(ex),
                                         *(() if shared is None else (shared.refresh(),)))
                elif shared is not None:
                    await asyncio.gather(self.admission.reserve(ex, key), shared.refresh())
                else:
                    await self.admission.reserve(ex, key)
            except Exception as exc:
                self._tracing.refused(span, exc)
                raise
            self._tracing.reserved(span, ex)

    def route(self, ex: Exchange) -> None:
        """Schedule; with no healthy endpoint for the model, its fallback models in order."""
        if self._circuits is not None:
            # Open circuits whose back-off is over turn half-open here, so routing offers them a probe.
            self._circuits.refresh()
        with self._tracing.span(spans.SPAN_ROUTE) as span:
            while True:
                try:
                    ex.decision = self.scheduler.schedule(ex.routing)
                    break
                except NoHealthyEndpoint:
                    if not self.reroute_model(ex):
                        raise
            self._tracing.routed(span, ex)

    async def prepare(self, ex: Exchange, headers: Mapping[str, str]) -> None:
        """Admit and route `ex`; on any refusal it is finished (refunded) before the error propagates."""
        try:
            key = await self.authenticate(ex, headers)
            await self.reserve(ex, key)
            self.route(ex)
        except BaseException as exc:
            ex.outcome = "error"
            ex.status = to_gateway_error(exc).status if isinstance(exc, Exception) else 499
            await self.finish(ex)
            raise

    # -- fallbacks --------------------------------------------------------------------------------
    def reroute_model(self, ex: Exchange) -> bool:
        """Switch `ex` to the next model of its fallback chain (False when none is left)."""
        first = ex.fallback_from or ex.model
        chain = self._resilience.fallbacks.get(first, [])
        at = chain.index(ex.model) + 1 if ex.model in chain else 0
        if at >= len(chain):
            return False
        model = chain[at]
        self.metrics.fallbacks.labels(first, model).inc()
        log.info("request %s falls back from model %s to %s", ex.request_id, ex.model, model)
        ex.fallback_from = first
        ex.model = model
        ex.replace_body({**ex.body, "model": model})
        routed, lora = self.routing_model(model)
        ex.routing = evolve(ex.routing, model=routed, lora=lora)
        ex.response_headers["x-gravity-fallback-model"] = model
        return True

    def reroute(self, ex: Exchange) -> bool:
        """For the dispatcher: the next fallback model that can be scheduled, or False."""
        while self.reroute_model(ex):
            try:
                ex.decision = self.scheduler.schedule(ex.routing)
                return True
            except NoHealthyEndpoint:
                continue
        return False

    # -- after dispatch ----------------------------------------------------------------------------
    async def picked(self, ex: Exchange) -> None:
        try:
            await self.sessions.picked(ex)
        except Exception:
            log.warning("could not record the session's endpoint for request %s", ex.request_id, exc_info=True)

    async def finish(self, ex: Exchange) -> None:
        """Account for a finished exchange exactly once: metrics, then settle or refund its budget."""
        if ex.done:
            return
        ex.done = True
        ex.finished_at = time.perf_counter()
        ticket = ex.extras.pop("inflight_ticket", None)
        if ticket is not None:  # held by an edge that tracks in-flight load itself (ext_proc)
            self.datastore.end(ticket)
        self.metrics.observe(ex)
        self._tracing.finished(ex)
        if self.access is not None:
            self.access.exchange(ex)
        await self.settle(ex)

    async def settle(self, ex: Exchange) -> None:
        """Settle (or refund) the budget once; the dispatcher calls it just before the last byte, so a
        client that sends its next request on the answer finds its concurrency slot free."""
        if ex.settled:
            return
        ex.settled = True
        try:
            await self.admission.finish(ex)
        except Exception:
            # Settlement trouble must not turn an answer into an error.
            log.exception("settling request %s failed", ex.request_id)
