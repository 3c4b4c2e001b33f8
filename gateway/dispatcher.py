"""The Dispatcher: one routine that owns a request's attempts, relays the answer, and resumes streams.

It drives the attempt state machine (policies/attempts.py) with real I/O through a `Transport`,
answering on an ASGI `send`: the first good answer, a stream continued on another endpoint after a
backend died or stalled, or the last real failure in OpenAI's shape. Used by the proxy routes and
the Responses API alike (ext_proc returns the ranked list and lets Envoy make the attempts).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson

from gateway.errors import (
    BadGateway,
    GatewayError,
    ServiceUnavailable,
    UpstreamTimeout,
    normalise_upstream_error,
)
from gateway.exchange import Exchange
from gateway.logs import OutcomeLog
from gateway.metrics import GatewayMetrics
from gateway.relay import DONE, ERROR_EVENT, STREAM_HEADERS, Relay, Send
from gateway.resume import ResumeState, resumable
from gateway.sse import EventSplitter
from gateway.telemetry import NOOP, Tracing
from gateway.telemetry.tracing import NO_ATTEMPT
from gateway.transport import (
    ConnectFailed,
    ConnectTimedOut,
    StreamBroken,
    Transport,
    UpstreamRequest,
)
from gateway.upstream import BackendTarget
from gateway.watchdog import Deadline, StallWatch
from policies.attempts import Attempt, AttemptPlan, AttemptPolicy, Failure, Stop, StopReason
from policies.circuit import CircuitBoard
from policies.resilience import ResilienceConfig
from policies.retry_budget import RetryBudget
from routing.datastore import Datastore, InflightTicket
from routing.scheduler import Scheduler

log = logging.getLogger("gravity.dispatch")

__all__ = ["Dispatcher"]

Reroute = Callable[[Exchange], bool]
"""Switch an exchange to its next fallback model and schedule it; False when none is left."""

_RESUMABLE_KINDS = frozenset({"vllm", "kserve"})
"""Backend kinds that continue a final assistant message (vLLM's continue_final_message)."""


class _Stalled(Exception):
    pass


class Dispatcher:
    def __init__(self, transport: Transport, targets: Mapping[str, BackendTarget], datastore: Datastore,
                 scheduler: Scheduler, circuits: CircuitBoard, budget: RetryBudget, cfg: ResilienceConfig,
                 metrics: GatewayMetrics, outcomes: OutcomeLog, *, debug_headers: bool,
                 picked: Callable[[Exchange], Awaitable[None]], reroute: Reroute,
                 settle: Callable[[Exchange], Awaitable[None]] | None = None,
                 on_refused: Callable[[str], None] = lambda endpoint: None,
                 clock: Callable[[], float] = time.monotonic, tracing: Tracing = NOOP) -> None:
        self._transport = transport
        self._targets = targets
        self._ds = datastore
        self._scheduler = scheduler
        self.circuits = circuits
        self.budget = budget
        self._cfg = cfg
        self._metrics = metrics
        self._outcomes = outcomes
        self._debug = debug_headers
        self._picked = picked
        self._reroute = reroute
        self._on_refused = on_refused
        self._settle = settle
        self._clock = clock
        self._tracing = tracing
        self._policies: dict[str, AttemptPolicy] = {}

    def policy(self, model: str) -> AttemptPolicy:
        """The model's attempt policy, built once (the config is frozen); models reaching here are served ones."""
        policy = self._policies.get(model)
        if policy is None:
            policy = self._cfg.attempt_policy(model)
            if len(self._policies) < 1024:
                self._policies[model] = policy
        return policy

    # -- one request ----------------------------------------------------------------------------
    async def run(self, ex: Exchange, send: Send, echo_id: bytes | None = None) -> None:
        """Answer `ex` on `send`; sets ex.status/outcome/usage/backend. Never raises but CancelledError."""
        run = _Run(self, ex, send, echo_id)
        try:
            await run.go()
        finally:
            run.close()


class _Run(Relay):
    """The state of one request's dispatch (kept off the Dispatcher, which is shared)."""

    def __init__(self, d: Dispatcher, ex: Exchange, send: Send, echo_id: bytes | None = None) -> None:
        super().__init__(ex, send, debug=d._debug, outcomes=d._outcomes, settle=d._settle, echo_id=echo_id)
        self.d = d
        self.ticket: InflightTicket | None = None
        self.last_error: GatewayError | None = None
        self.plan: AttemptPlan | None = None

    def close(self) -> None:
        if self.span is not NO_ATTEMPT:  # still open: the request was cancelled or the client left
            self.span.cancelled()
            self.span = NO_ATTEMPT
        self._release()
        self._end_ticket()
        if self.plan is not None:
            self.plan.abandoned()

    def _release(self) -> None:
        if self.resp is not None:
            self.resp.release()
            self.resp = None

    def _end_ticket(self) -> None:
        if self.ticket is not None:
            self.d._ds.end(self.ticket)
            self.ticket = None

    # -- the attempt loop ----------------------------------------------------------------------------
    async def go(self) -> None:
        ex, d = self.ex, self.d
        while True:
            plan = self._new_plan()
            action: Attempt | Stop | None = plan.start()
            while isinstance(action, Attempt):
                action = await self._attempt(plan, action)
            if action is None:
                return
            if self.started:
                await self._end_stream_with_error(action)
                return
            if action.reason in (StopReason.NO_ENDPOINT, StopReason.EXHAUSTED, StopReason.BUDGET) \
                    and d._reroute(ex):
                continue  # the next fallback model, scheduled afresh
            await self._send_error(self._stop_error(action))
            return

    def _new_plan(self) -> AttemptPlan:
        ex, d = self.ex, self.d
        assert ex.decision is not None
        policy = d.policy(ex.model)
        kinds_ok = all(d._targets[c.endpoint].kind in _RESUMABLE_KINDS for c in ex.decision.ranked)
        ex.resumable = ex.stream and kinds_ok and resumable(ex.route, ex.body)
        self.plan = AttemptPlan([c.endpoint for c in ex.decision.ranked], policy, d._clock(), d.budget,
                                d.circuits, resumable=ex.resumable)
        return self.plan

    async def _attempt(self, plan: AttemptPlan, attempt: Attempt) -> Attempt | Stop | None:
        """One attempt; None when the request is answered, else the plan's next action."""
        ex, d = self.ex, self.d
        ex.attempts += 1
        endpoint = attempt.endpoint
        kind = "resume" if attempt.resume else ("retry" if attempt.number > 1 else "first")
        d._metrics.attempts.labels(endpoint, kind).inc()
        body = self._body(attempt)
        if body is None:  # a resumed stream had nothing left to produce
            await self._finish_owed_nothing()
            return None
        cand = next((c for c in ex.decision.ranked if c.endpoint == endpoint), None) if ex.decision else None
        self.ticket = d._ds.begin(endpoint, cand.uncached_tokens if cand else 0, ex.routing.max_tokens)
        d._scheduler.observe(ex.routing, endpoint)
        target = d._targets[endpoint]
        headers = dict(ex.forward_headers)
        headers["content-type"] = "application/json"
        if target.auth_header:
            headers["authorization"] = target.auth_header
        self.span = d._tracing.attempt(ex, attempt.number, kind, target, headers)
        deadline = Deadline(plan.first_byte_timeout(d._clock()))
        try:
            try:
                self.resp = await d._transport.send(UpstreamRequest(f"{target.api_base}/{ex.route}", headers, body))
                if self.resp.status >= 400:
                    return await self._upstream_error(plan, attempt)
                if ex.stream and self.resp.content_type == "text/event-stream":
                    chunks = self.resp.chunks()
                    first = await anext(chunks, b"")
                    self.span.first_chunk()
                    if first.startswith(ERROR_EVENT):  # failed before the client saw a byte: retry
                        raise StreamBroken("the backend answered the stream with an error event")
                else:
                    whole = await self.resp.read()
            except asyncio.CancelledError:
                if deadline.expired():
                    raise TimeoutError from None
                raise
            finally:
                deadline.close()
        except ConnectFailed as exc:
            return self._failed(plan, Failure.CONNECT, f"connect failed: {exc}", refused=exc.refused,
                                streamed=attempt.resume)
        except ConnectTimedOut:
            return self._failed(plan, Failure.CONNECT_TIMEOUT, "connect timed out", streamed=attempt.resume)
        except TimeoutError:
            return self._failed(plan, Failure.FIRST_BYTE_TIMEOUT, "no first byte in time", streamed=attempt.resume)
        except StreamBroken as exc:
            return self._failed(plan, Failure.BROKEN, f"connection lost: {exc}", streamed=attempt.resume)
        ex.backend = endpoint
        await d._picked(ex)
        if ex.stream and self.resp.content_type == "text/event-stream":
            # Judged by its end, not its first byte: a replica that stalls mid-stream must not close
            # its circuit with a half-open probe that breaks a few tokens later.
            return await self._relay_stream(plan, attempt, chunks, first)
        plan.succeeded()
        await self._relay_whole(whole)
        return None

    def _body(self, attempt: Attempt) -> bytes | None:
        ex = self.ex
        if not attempt.resume:
            return ex.upstream_body()
        assert self.state is not None
        return self.state.continuation()

    def _failed(self, plan: AttemptPlan, failure: Failure, why: str, *, refused: bool = False,
                streamed: bool = False, status: int | None = None) -> Attempt | Stop:
        ex, d = self.ex, self.d
        endpoint = plan.tried[-1].endpoint
        self.span.failed(failure.value, status)
        self.span = NO_ATTEMPT
        self._release()
        self._end_ticket()
        d._metrics.upstream_errors.labels(endpoint, failure.value).inc()
        if refused:
            # Nothing listens: out of routing until a probe or a scrape finds it back (restarted).
            d._ds.set_healthy(endpoint, False, why)
            d._on_refused(endpoint)
        if failure is not Failure.STATUS or status is None or status >= 500 or status == 429:
            d._outcomes.note(f"attempt:{endpoint}:{failure.value}", "backend %s failed an attempt: %s", endpoint,
                             why)
        # The client is told of the last real failure (a status sets its own before calling here).
        if failure is Failure.FIRST_BYTE_TIMEOUT:
            self.last_error = UpstreamTimeout("The backend did not answer in time.")
        elif failure in (Failure.BROKEN, Failure.STALLED):
            self.last_error = BadGateway(f"The backend connection failed ({failure.value}).")
        elif failure in (Failure.CONNECT, Failure.CONNECT_TIMEOUT):
            self.last_error = ServiceUnavailable(f"No healthy backend is available for model '{ex.model}'.",
                                                 code="no_healthy_backend", retry_after=1)
        action = plan.failed(failure, d._clock(), status=status, streamed=streamed)
        if isinstance(action, Attempt):
            d._metrics.retries.labels(endpoint, failure.value).inc()
        ex.response_headers["x-gravity-attempts"] = str(plan.attempts)
        return action

    async def _upstream_error(self, plan: AttemptPlan, attempt: Attempt) -> Attempt | Stop | None:
        ex, d = self.ex, self.d
        resp = self.resp
        assert resp is not None
        endpoint = plan.tried[-1].endpoint
        body = await resp.read()
        if resp.status in (401, 403):
            d._outcomes.note(f"upstream-auth:{endpoint}", "backend %s refused the gateway's credentials (HTTP %d): "
                             "check its api_key; an operator problem, clients get 502 upstream_auth_error",
                             endpoint, resp.status)
        self.last_error = normalise_upstream_error(resp.status, body, resp.headers.get("retry-after"))
        action = self._failed(plan, Failure.STATUS, f"HTTP {resp.status}", status=resp.status,
                              streamed=attempt.resume)
        if isinstance(action, Stop) and action.reason is StopReason.NOT_RETRYABLE and not self.started:
            ex.backend = endpoint
            await self._send_error(self.last_error, outcome="upstream_error")
            return None
        return action

    def _stop_error(self, stop: Stop) -> GatewayError:
        if stop.reason is StopReason.DEADLINE:
            return UpstreamTimeout("The request did not complete within its deadline.")
        if stop.reason is StopReason.NO_ENDPOINT or self.last_error is None:
            return ServiceUnavailable(f"No healthy backend is available for model '{self.ex.model}'.",
                                      code="no_healthy_backend", retry_after=1)
        return self.last_error

    async def _relay_stream(self, plan: AttemptPlan, attempt: Attempt, chunks: Any, first: bytes
                            ) -> Attempt | Stop | None:
        ex, d = self.ex, self.d
        self.error_event = False
        if not self.started:
            ex.first_chunk_at = time.perf_counter()
            await self._start(200, dict(STREAM_HEADERS))
            if plan.resumable:
                self.state = ResumeState(ex.route, orjson.loads(ex.upstream_body()))
        if self.ticket is not None:
            d._ds.first_token(self.ticket)
        state = self.state
        resumed = attempt.resume
        splitter = EventSplitter()
        clock = d._clock
        watch = StallWatch(plan.policy.stall_timeout_s, plan.deadline, clock)
        chunk: bytes | None = first
        try:
            try:
                while chunk:
                    out = self._pass(splitter, chunk, state, resumed)
                    if out:
                        await self.send({"type": "http.response.body", "body": out, "more_body": True})
                    if self.error_event:
                        raise StreamBroken("the backend ended the stream with an error event")
                    now = clock()
                    if now >= plan.deadline:
                        raise _Stalled()
                    watch.since = now
                    chunk = await anext(chunks, b"")
                    watch.since = None
            except asyncio.CancelledError:
                if watch.stalled():
                    raise _Stalled() from None
                raise
            finally:
                watch.close()
        except (_Stalled, StreamBroken) as exc:
            failure = Failure.STALLED if isinstance(exc, _Stalled) else Failure.BROKEN
            if state is not None:
                state.absorb()
                if state.unsafe:
                    plan.resumable = False
            action = self._failed(plan, failure, "stream stalled" if failure is Failure.STALLED
                                  else f"stream broken: {exc}", streamed=True)
            if isinstance(action, Attempt) and state is not None:
                state.resumes += 1
                d._metrics.resumes.labels(plan.tried[-2].endpoint, failure.value).inc()
            return action
        plan.succeeded()
        rest = splitter.rest()
        if rest.strip():
            out = self._filter([rest], state, resumed)
            if out:
                await self.send({"type": "http.response.body", "body": out, "more_body": True})
        if state is not None and state.resumes:
            ex.response_headers["x-gravity-resumes"] = str(state.resumes)
        await self._finish_stream()
        return None

    async def _end_stream_with_error(self, stop: Stop) -> None:
        """The stream cannot be continued: an OpenAI-shaped error event, then [DONE] (never a silent cut)."""
        ex = self.ex
        err = self._stop_error(stop)
        ex.outcome = "upstream_error"
        await self._last(b"data: " + orjson.dumps(err.body()) + b"\n\n" + DONE)
