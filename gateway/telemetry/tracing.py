"""The span helpers the gateway's layers call: one SERVER span per request, its children, and the
CLIENT span of each upstream attempt with the GenAI attributes.

`Tracing.enabled` False (no endpoint configured) is the no-op path: every helper returns a shared
do-nothing object, nothing is recorded and no header is touched (the client's traceparent is passed
through as it came). Spans come from a `Recorder` (spans.py: the gateway's own; sdk.py: the
OpenTelemetry SDK's, for gRPC); the hooks record their attributes in fixed groups (otlp.Shape), which
the gateway's recorder encodes once per distinct group of values.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from gateway.telemetry import names as N
from gateway.telemetry.attempt import NO_ATTEMPT, AttemptSpan, _NoAttempt, input_messages
from gateway.telemetry.context import CURRENT, NO_SERVER, ServerSpan, _NoServer, current_trace_id
from gateway.telemetry.otlp import Shape
from gateway.telemetry.spans import CLIENT, INTERNAL, SERVER, Recorder, error_type, parse_traceparent

if TYPE_CHECKING:
    from gateway.exchange import Exchange
    from gateway.telemetry.export import ExportCounters
    from gateway.upstream import BackendTarget
    from policies.keys import ApiKey

__all__ = ["NOOP", "NO_ATTEMPT", "AttemptSpan", "ServerSpan", "Tracing", "current_trace_id", "error_type"]

_NULL = contextlib.nullcontext()

# The attribute groups each hook records (otlp.Shape); `cached` ones hold low-cardinality values only.
_REQUEST = Shape(N.HTTP_REQUEST_METHOD, N.URL_PATH, N.URL_SCHEME, N.CLIENT_ADDRESS, cached=True)
_REQUEST_ID = Shape(N.REQUEST_ID)
_AUTH = Shape(N.TENANT, N.PRIORITY, N.AUTH_RESULT, cached=True)
_UNLIMITED = Shape(N.RATELIMIT_DECISION, cached=True)
_ALLOWED = Shape(N.RATELIMIT_DECISION, N.RATELIMIT_SCOPES, N.RATELIMIT_WHERE, cached=True)
_BUDGET = Shape(N.RATELIMIT_RESERVED_TOKENS, N.RATELIMIT_REMAINING_TOKENS, N.RATELIMIT_REMAINING_REQUESTS)
_REFUSED = Shape(N.RATELIMIT_DECISION, N.RATELIMIT_BOUND_SCOPE, N.RATELIMIT_KIND, cached=True)
_ROUTE = Shape(N.ROUTE_PROFILE, N.ROUTE_ENDPOINT, N.ROUTE_CANDIDATES, N.ROUTE_SESSION_HIT, N.ROUTE_FALLBACK_MODEL,
               cached=True)
_ROUTE_FIGURES = Shape(N.ROUTE_CANDIDATE_SCORES, N.ROUTE_LATENCY, N.ROUTE_PREFIX_MATCH_RATIO)
_OUTCOME = Shape(N.OUTCOME, N.ATTEMPTS, cached=True)
_TARGET = Shape(N.GEN_AI_OPERATION_NAME, N.GEN_AI_PROVIDER_NAME, N.GEN_AI_REQUEST_MODEL, N.GEN_AI_REQUEST_STREAM,
                N.SERVER_ADDRESS, N.SERVER_PORT, N.ATTEMPT_NUMBER, N.ATTEMPT_KIND, N.ATTEMPT_ENDPOINT,
                N.GEN_AI_REQUEST_MAX_TOKENS, N.GEN_AI_REQUEST_TEMPERATURE, N.GEN_AI_REQUEST_TOP_P,
                N.GEN_AI_REQUEST_CHOICE_COUNT, cached=True)
_REQUEST_IDS = Shape(N.GEN_AI_REQUEST_SEED, N.GEN_AI_CONVERSATION_ID, N.GEN_AI_REQUEST_PREVIOUS_RESPONSE_ID)
_scorer_shapes: dict[tuple[str, ...], Shape] = {}


def _scores(names: tuple[str, ...]) -> Shape:
    """The per-scorer score attributes of one profile's scorers (a few profiles: a few shapes)."""
    shape = _scorer_shapes.get(names)
    if shape is None:
        shape = Shape(*(N.ROUTE_SCORE_PREFIX + n for n in names))
        if len(_scorer_shapes) < 256:
            _scorer_shapes[names] = shape
    return shape


def _number(v: object) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


class Tracing:
    """Span helpers over one recorder (or none: the no-op path)."""

    def __init__(self, recorder: Recorder | None = None, *, capture_content: bool = False,
                 processor: Any = None, counters: ExportCounters | None = None) -> None:
        self.enabled = recorder is not None
        self._tracer = recorder
        self.capture_content = capture_content
        self.processor = processor
        self.counters = counters
        self._servers: dict[str, tuple[str, int]] = {}

    # -- lifecycle (the lifespan calls these) ----------------------------------------------------------
    async def start(self) -> None:
        if self.processor is not None:
            await self.processor.start()

    async def stop(self) -> None:
        if self.processor is not None:
            await self.processor.stop()

    async def flush(self) -> None:
        if self.processor is not None:
            await self.processor.flush()

    # -- the SERVER span --------------------------------------------------------------------------------
    def server(self, scope: MutableMapping[str, Any], route: str | None = None) -> ServerSpan | _NoServer:
        """The SERVER span of one HTTP request, joined to the client's trace when it sent a traceparent."""
        tracer = self._tracer
        if tracer is None:
            return NO_SERVER
        traceparent = tracestate = None
        for k, v in scope["headers"]:
            if k == b"traceparent":
                traceparent = v.decode("latin-1")
            elif k == b"tracestate":
                tracestate = v.decode("latin-1")
        parent = parse_traceparent(traceparent, tracestate) if traceparent is not None else None
        method = scope["method"]
        span = tracer.start(f"{method} {route}" if route else method, SERVER, None, parent)
        if span.is_recording():  # a span sampled out costs its ids and nothing more
            client = scope.get("client")
            span.record(_REQUEST, (method, scope["path"], scope.get("scheme", "http"), client[0] if client else None))
            request_id = scope.get("state", {}).get("request_id")
            if request_id:
                span.record(_REQUEST_ID, (request_id,))
        return ServerSpan(span, scope, route)

    def pick(self, headers: Mapping[str, str], method: str, path: str) -> ServerSpan | _NoServer:
        """The ext_proc edge's SERVER span for one routing decision, joined to the request's traceparent."""
        tracer = self._tracer
        if tracer is None:
            return NO_SERVER
        tp = headers.get("traceparent")
        parent = parse_traceparent(tp, headers.get("tracestate")) if tp else None
        attributes = {N.HTTP_REQUEST_METHOD: method, N.URL_PATH: path, N.HTTP_ROUTE: path}
        return ServerSpan(tracer.start(f"ext_proc {method} {path}", SERVER, attributes, parent), None)

    # -- internal children ----------------------------------------------------------------------------
    def span(self, name: str, attributes: Mapping[str, Any] | None = None,
             kind: int = INTERNAL) -> contextlib.AbstractContextManager[Any]:
        """A child of the current span (None inside the block when tracing is off); an exception marks it."""
        if self._tracer is None:
            return _NULL
        parent = CURRENT.get()
        if parent is not None and not parent.sampled:
            # Every sampler here decides a child as its parent (parent-based, or the same trace id's
            # ratio): a child of a span sampled out would be too, and an internal one is never propagated.
            return _NULL
        span: contextlib.AbstractContextManager[Any] = self._tracer.start(
            name, kind, dict(attributes) if attributes else None, parent)
        return span

    def annotate_current(self, attributes: Mapping[str, Any]) -> None:
        if self._tracer is not None:
            span = CURRENT.get()
            if span is not None and span.is_recording():
                span.set_attributes(attributes)

    # -- what the layers record --------------------------------------------------------------------------
    @staticmethod
    def authenticated(span: Any, ex: Exchange, key: ApiKey) -> None:
        if span is None or not span.is_recording():
            return
        span.record(_AUTH, (ex.tenant, ex.routing.priority, "ok"))

    @staticmethod
    def reserved(span: Any, ex: Exchange) -> None:
        if span is None or not span.is_recording():
            return
        held = ex.extras.get("admission")
        if held is None:
            span.record(_UNLIMITED, ("unlimited",))
            return
        reservation = held[0]
        v = reservation.verdict
        span.record(_ALLOWED, ("allowed", tuple([s.label for s in reservation.scopes]), reservation.where))
        span.record(_BUDGET, (reservation.reserved, v.remaining_tokens if v.remaining_tokens >= 0 else None,
                              v.remaining_requests if v.remaining_requests >= 0 else None))

    @staticmethod
    def refused(span: Any, exc: BaseException) -> None:
        """A rate-limit refusal: which scope bound and on what."""
        if span is None or not span.is_recording():
            return
        if getattr(exc, "code", None) != "rate_limit_exceeded":
            span.set_attribute(N.RATELIMIT_DECISION, "error")
            return
        scope = getattr(exc, "scope", None)
        kind = getattr(exc, "error_type", None)
        span.record(_REFUSED, ("rejected", scope if isinstance(scope, str) else None,
                               kind if isinstance(kind, str) else None))

    @staticmethod
    def routed(span: Any, ex: Exchange) -> None:
        if span is None or not span.is_recording() or ex.decision is None:
            return
        d = ex.decision
        ranked = d.ranked
        best = ranked[0]
        routing = ex.routing
        span.record(_ROUTE, (d.profile, best.endpoint, tuple([c.endpoint for c in ranked]),
                             (routing.session_endpoint is not None) if routing.session_id else None,
                             ex.model if ex.fallback_from else None))
        scores = best.scores
        prompt = routing.prompt_tokens
        ratio = max(0.0, 1.0 - best.uncached_tokens / prompt) if scores and prompt > 0 else None
        span.record(_ROUTE_FIGURES, (tuple([float(c.score) for c in ranked]), d.latency_s, ratio))
        if scores:
            span.record(_scores(tuple(scores)), tuple([float(x) for x in scores.values()]))

    def finished(self, ex: Exchange) -> None:
        """The request's outcome on the current (SERVER) span."""
        if self._tracer is None:
            return
        span = CURRENT.get()
        if span is None or not span.is_recording():
            return
        # The rest (tenant, model, endpoint) is on the children: one copy per trace is enough.
        span.record(_OUTCOME, (ex.outcome, ex.attempts))

    # -- upstream attempts ----------------------------------------------------------------------------
    def attempt(self, ex: Exchange, number: int, kind: str, target: BackendTarget,
                headers: dict[str, str]) -> AttemptSpan | _NoAttempt:
        """Start an attempt's CLIENT span and put its traceparent in `headers` (the upstream request's)."""
        tracer = self._tracer
        if tracer is None:
            return NO_ATTEMPT
        op = N.OPERATION.get(ex.route, ex.route)
        span = tracer.start(f"{op} {ex.model}", CLIENT, None, CURRENT.get())
        headers["traceparent"] = span.traceparent()
        if span.tracestate:
            headers["tracestate"] = span.tracestate
        else:  # a tracestate without a valid traceparent means nothing (W3C trace context)
            headers.pop("tracestate", None)
        if not span.is_recording():
            return NO_ATTEMPT  # sampled out: the backend still gets the trace and the decision
        self._attempt_attributes(span, ex, op, number, kind, target)
        return AttemptSpan(span, self.capture_content)

    def _attempt_attributes(self, span: Any, ex: Exchange, op: str, number: int, kind: str,
                            target: BackendTarget) -> None:
        body = ex.body
        server = self._servers.get(target.api_base)
        if server is None:
            parts = urlsplit(target.api_base)
            server = self._servers[target.api_base] = (parts.hostname or "",
                                                       parts.port or (443 if parts.scheme == "https" else 80))
        n = _int(body.get("n"))
        span.record(_TARGET, (
            op, N.PROVIDER.get(target.kind, target.kind), ex.model, ex.stream, server[0], server[1], number, kind,
            target.name, _int(body.get("max_completion_tokens", body.get("max_tokens"))),
            _number(body.get("temperature")), _number(body.get("top_p")), n if n != 1 else None))
        seed = _int(ex.pin_seed if ex.pin_seed is not None else body.get("seed"))
        turn = ex.extras.get("state.turn")
        req = getattr(turn, "req", None)
        conversation = getattr(req, "conversation_id", None)
        previous = getattr(req, "previous_response_id", None)
        if not isinstance(conversation, str):
            session = ex.routing.session_id
            conversation = session if session and not session.startswith("thread:") else None
        if seed is not None or conversation is not None or isinstance(previous, str):
            span.record(_REQUEST_IDS, (seed, conversation, previous if isinstance(previous, str) else None))
        if self.capture_content:
            span.set_attribute(N.GEN_AI_INPUT_MESSAGES, input_messages(body))


NOOP = Tracing()
"""Tracing off: every helper is a no-op."""
