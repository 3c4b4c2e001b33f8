"""The span helpers the gateway's layers call: one SERVER span per request, its children, and the
CLIENT span of each upstream attempt with the GenAI attributes.

`Tracing.enabled` False (no endpoint configured) is the no-op path: every helper returns a shared
do-nothing object, nothing is recorded and no header is touched (the client's traceparent is passed
through as it came). Parenting uses a context variable of the request's task: the SERVER span is made
current in `GatewayApp`, and everything the request does runs in that task. Spans come from a `Recorder`
(spans.py: the gateway's own; sdk.py: the OpenTelemetry SDK's, for gRPC).
"""
from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import urlsplit

import orjson

from gateway.errors import to_gateway_error
from gateway.sse import event_json
from gateway.telemetry import names as N
from gateway.telemetry.spans import CLIENT, INTERNAL, SERVER, Recorder, parse_traceparent

if TYPE_CHECKING:
    from gateway.exchange import Exchange
    from gateway.telemetry.export import ExportCounters
    from gateway.upstream import BackendTarget
    from policies.keys import ApiKey

__all__ = ["NOOP", "AttemptSpan", "ServerSpan", "Tracing", "current_trace_id", "error_type"]

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
_NULL = contextlib.nullcontext()
_CURRENT: contextvars.ContextVar[Any] = contextvars.ContextVar("gravity_span", default=None)
"""The request's current span (its SERVER span); children are started under it."""


def current_trace_id() -> str | None:
    """The trace id of the request being served (hex), None when tracing is off or outside a request."""
    span = _CURRENT.get()
    return span.trace_id.hex() if span is not None else None


def error_type(exc: BaseException) -> str:
    """A low-cardinality name for what went wrong: the OpenAI error code when there is one, else the class."""
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code:
        return code
    return type(exc).__qualname__


def _mark_error(span: Any, kind: str, message: str | None = None) -> None:
    span.set_attribute(N.ERROR_TYPE, kind)
    span.set_error(message)


class _NoServer:
    """The SERVER span when tracing is off: nothing at all."""

    __slots__ = ()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


_NO_SERVER = _NoServer()


class ServerSpan:
    """The request's SERVER span, current for the duration of the `with` block."""

    __slots__ = ("_scope", "_token", "span")

    def __init__(self, span: Any, scope: MutableMapping[str, Any] | None) -> None:
        self.span = span
        self._scope = scope
        """The ASGI scope: its matched route names the span, `state.response_status` is the answer's."""
        self._token: object = None

    def __enter__(self) -> Self:
        self._token = _CURRENT.set(self.span)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        span = self.span
        try:
            scope = self._scope
            status = 0
            if scope is not None and span.is_recording():
                template = getattr(scope.get("route"), "path", None)
                if isinstance(template, str):
                    span.update_name(f"{scope['method']} {template}")
                    span.set_attribute(N.HTTP_ROUTE, template)
                status = scope["state"].get("response_status") or 0
                if status:
                    span.set_attribute(N.HTTP_RESPONSE_STATUS_CODE, status)
            if isinstance(exc, Exception) and scope is None:
                # The ext_proc edge answers refusals itself: the error's status is the answer.
                failed = to_gateway_error(exc).status
                span.set_attribute(N.HTTP_RESPONSE_STATUS_CODE, failed)
                if failed >= 500:
                    _mark_error(span, error_type(exc))
            elif exc is not None and not isinstance(exc, GeneratorExit):
                _mark_error(span, error_type(exc))
            elif status >= 500:  # a 4xx is the client's error, not the server span's (HTTP conventions)
                _mark_error(span, str(status))
            span.end()
        finally:
            _CURRENT.reset(self._token)  # type: ignore[arg-type]


class _Child:
    """A child span for the length of a `with` block; an exception marks it failed."""

    __slots__ = ("span",)

    def __init__(self, span: Any) -> None:
        self.span = span

    def __enter__(self) -> Any:
        return self.span

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is not None:
            _mark_error(self.span, error_type(exc) if not isinstance(exc, BaseExceptionGroup) else "error")
        self.span.end()


class _NoAttempt:
    __slots__ = ()
    recording = False

    def first_chunk(self) -> None:
        pass

    def events(self, events: list[bytes]) -> None:
        pass

    def body(self, body: bytes) -> None:
        pass

    def failed(self, failure: str, status: int | None = None) -> None:
        pass

    def done(self, ex: Exchange) -> None:
        pass

    def cancelled(self) -> None:
        pass


NO_ATTEMPT = _NoAttempt()


class AttemptSpan:
    """One upstream attempt as a CLIENT span `{gen_ai.operation.name} {gen_ai.request.model}`.

    Ends exactly once: `failed`, `done`, or `cancelled` (the dispatcher calls that for whatever is still
    open when it stops, so a client disconnect or a cancelled stream ends the span too)."""

    __slots__ = ("_capture", "_finish", "_identity", "_started", "_text", "recording", "span")

    def __init__(self, span: Any, capture: bool) -> None:
        self.span = span
        self.recording = span.is_recording()
        self._started = time.perf_counter()
        self._identity = False
        self._finish: list[str] = []
        self._capture = capture
        self._text: list[str] | None = [] if capture else None

    def first_chunk(self) -> None:
        if self.recording:
            self.span.set_attribute(N.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK, time.perf_counter() - self._started)

    def events(self, events: list[bytes]) -> None:
        """Streamed events as relayed: the response's id and model from the first, finish reasons as they come."""
        if not self.recording:
            return
        for event in events:
            if not self._identity or self._capture or b'"finish_reason":"' in event \
                    or b'"finish_reason": "' in event:
                payload = event_json(event)
                if not isinstance(payload, dict):
                    continue
                if not self._identity:
                    self._identify(payload)
                self._choices(payload, "delta")

    def body(self, body: bytes) -> None:
        """A whole (non-streamed) answer."""
        if not self.recording:
            return
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        if not isinstance(payload, dict):
            return
        self._identify(payload)
        self._choices(payload, "message")

    def _choices(self, payload: dict[str, Any], part: str) -> None:
        """Finish reasons, and the text when captured, of an answer's (`message`) or a chunk's (`delta`)
        choices; completions carry `text` instead."""
        for choice in payload.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            reason = choice.get("finish_reason")
            if isinstance(reason, str):
                self._finish.append(reason)
            if self._text is not None:
                inner = choice.get(part)
                piece = inner.get("content") if isinstance(inner, dict) else choice.get("text")
                if isinstance(piece, str):
                    self._text.append(piece)

    def _identify(self, payload: dict[str, Any]) -> None:
        self._identity = True
        rid, model = payload.get("id"), payload.get("model")
        if isinstance(rid, str):
            self.span.set_attribute(N.GEN_AI_RESPONSE_ID, rid)
        if isinstance(model, str):
            self.span.set_attribute(N.GEN_AI_RESPONSE_MODEL, model)

    def failed(self, failure: str, status: int | None = None) -> None:
        span = self.span
        span.set_attribute(N.ATTEMPT_FAILURE, failure)
        if status is not None:
            span.set_attribute(N.HTTP_RESPONSE_STATUS_CODE, status)
        _mark_error(span, str(status) if status is not None else failure)
        self._end()

    def done(self, ex: Exchange) -> None:
        span = self.span
        if self.recording:
            if self._finish:
                span.set_attribute(N.GEN_AI_RESPONSE_FINISH_REASONS, self._finish)
            usage = ex.usage
            if usage:
                _usage(span, usage)
            if ex.status:
                span.set_attribute(N.HTTP_RESPONSE_STATUS_CODE, ex.status)
            if self._text is not None:
                span.set_attribute(N.GEN_AI_OUTPUT_MESSAGES, orjson.dumps([
                    {"role": "assistant", "parts": [{"type": "text", "content": "".join(self._text)}],
                     "finish_reason": self._finish[0] if self._finish else "error"}]).decode())
        if ex.status >= 400:
            _mark_error(span, str(ex.status))
        self._end()

    def cancelled(self) -> None:
        if self.recording and not self._finish:
            self.span.set_attribute(N.GEN_AI_RESPONSE_FINISH_REASONS, ["error"])
        _mark_error(self.span, "cancelled", "the request ended before this attempt did")
        self._end()

    def _end(self) -> None:
        self.span.end()


def _usage(span: Any, usage: Mapping[str, Any]) -> None:
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(prompt, int):
        span.set_attribute(N.GEN_AI_USAGE_INPUT_TOKENS, prompt)
    if isinstance(completion, int):
        span.set_attribute(N.GEN_AI_USAGE_OUTPUT_TOKENS, completion)
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
        span.set_attribute(N.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS, details["cached_tokens"])


def _input_messages(body: Mapping[str, Any]) -> str:
    """The request's messages in the conventions' shape (opt-in only)."""
    out = []
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict):
                content = m.get("content")
                text = content if isinstance(content, str) else orjson.dumps(content).decode()
                out.append({"role": m.get("role"), "parts": [{"type": "text", "content": text}]})
    else:
        prompt = body.get("prompt") if "prompt" in body else body.get("input")
        out.append({"role": "user", "parts": [{"type": "text", "content": prompt if isinstance(prompt, str)
                                               else orjson.dumps(prompt).decode()}]})
    return orjson.dumps(out).decode()


class Tracing:
    """Span helpers over one TracerProvider (or none: the no-op path)."""

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
            return _NO_SERVER
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
            attributes: dict[str, Any] = {N.HTTP_REQUEST_METHOD: method, N.URL_PATH: scope["path"],
                                          N.URL_SCHEME: scope.get("scheme", "http")}
            client = scope.get("client")
            if client:
                attributes[N.CLIENT_ADDRESS] = client[0]
            if route is not None:
                attributes[N.HTTP_ROUTE] = route
            request_id = scope.get("state", {}).get("request_id")
            if request_id:
                attributes[N.REQUEST_ID] = request_id
            span.set_attributes(attributes)
        return ServerSpan(span, scope)

    def pick(self, headers: Mapping[str, str], method: str, path: str) -> ServerSpan | _NoServer:
        """The ext_proc edge's SERVER span for one routing decision, joined to the request's traceparent."""
        tracer = self._tracer
        if tracer is None:
            return _NO_SERVER
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
        parent = _CURRENT.get()
        if parent is not None and not parent.sampled:
            # Every sampler here decides a child as its parent (parent-based, or the same trace id's
            # ratio): a child of a span sampled out would be too, and an internal one is never propagated.
            return _NULL
        return _Child(self._tracer.start(name, kind, dict(attributes) if attributes else None, parent))

    def annotate_current(self, attributes: Mapping[str, Any]) -> None:
        if self._tracer is not None:
            span = _CURRENT.get()
            if span is not None and span.is_recording():
                span.set_attributes(attributes)

    # -- what the layers record --------------------------------------------------------------------------
    @staticmethod
    def authenticated(span: Any, ex: Exchange, key: ApiKey) -> None:
        if span is None or not span.is_recording():
            return
        span.set_attributes({N.TENANT: ex.tenant, N.PRIORITY: ex.routing.priority, N.AUTH_RESULT: "ok"})

    @staticmethod
    def reserved(span: Any, ex: Exchange) -> None:
        if span is None or not span.is_recording():
            return
        held = ex.extras.get("admission")
        if held is None:
            span.set_attribute(N.RATELIMIT_DECISION, "unlimited")
            return
        reservation = held[0]
        v = reservation.verdict
        labels = [s.label for s in reservation.scopes]
        attrs: dict[str, Any] = {N.RATELIMIT_DECISION: "allowed", N.RATELIMIT_SCOPES: labels,
                                 N.RATELIMIT_RESERVED_TOKENS: reservation.reserved,
                                 N.RATELIMIT_WHERE: reservation.where}
        if v.remaining_tokens >= 0:
            attrs[N.RATELIMIT_REMAINING_TOKENS] = v.remaining_tokens
        if v.remaining_requests >= 0:
            attrs[N.RATELIMIT_REMAINING_REQUESTS] = v.remaining_requests
        span.set_attributes(attrs)

    @staticmethod
    def refused(span: Any, exc: BaseException) -> None:
        """A rate-limit refusal: which scope bound and on what."""
        if span is None or not span.is_recording():
            return
        if getattr(exc, "code", None) != "rate_limit_exceeded":
            span.set_attribute(N.RATELIMIT_DECISION, "error")
            return
        scope = getattr(exc, "scope", None)
        attrs: dict[str, Any] = {N.RATELIMIT_DECISION: "rejected"}
        if isinstance(scope, str):
            attrs[N.RATELIMIT_BOUND_SCOPE] = scope
        kind = getattr(exc, "error_type", None)
        if isinstance(kind, str):
            attrs[N.RATELIMIT_KIND] = kind
        span.set_attributes(attrs)

    @staticmethod
    def routed(span: Any, ex: Exchange) -> None:
        if span is None or not span.is_recording() or ex.decision is None:
            return
        d = ex.decision
        best = d.ranked[0]
        attrs: dict[str, Any] = {
            N.ROUTE_PROFILE: d.profile, N.ROUTE_ENDPOINT: best.endpoint,
            N.ROUTE_CANDIDATES: [c.endpoint for c in d.ranked],
            N.ROUTE_CANDIDATE_SCORES: [float(c.score) for c in d.ranked],
            N.ROUTE_LATENCY: d.latency_s,
        }
        scores = best.scores
        for scorer, value in scores.items():
            attrs[N.ROUTE_SCORE_PREFIX + scorer] = float(value)
        prompt = ex.routing.prompt_tokens
        if scores and prompt > 0:
            attrs[N.ROUTE_PREFIX_MATCH_RATIO] = max(0.0, 1.0 - best.uncached_tokens / prompt)
        if ex.routing.session_id:
            attrs[N.ROUTE_SESSION_HIT] = ex.routing.session_endpoint is not None
        if ex.fallback_from:
            attrs[N.ROUTE_FALLBACK_MODEL] = ex.model
        span.set_attributes(attrs)

    def finished(self, ex: Exchange) -> None:
        """The request's outcome on the current (SERVER) span."""
        if self._tracer is None:
            return
        span = _CURRENT.get()
        if span is None or not span.is_recording():
            return
        # The rest (tenant, model, endpoint) is on the children: one copy per trace is enough.
        span.set_attributes({N.OUTCOME: ex.outcome, N.ATTEMPTS: ex.attempts})

    # -- upstream attempts ----------------------------------------------------------------------------
    def attempt(self, ex: Exchange, number: int, kind: str, target: BackendTarget,
                headers: dict[str, str]) -> AttemptSpan | _NoAttempt:
        """Start an attempt's CLIENT span and put its traceparent in `headers` (the upstream request's)."""
        tracer = self._tracer
        if tracer is None:
            return NO_ATTEMPT
        op = N.OPERATION.get(ex.route, ex.route)
        span = tracer.start(f"{op} {ex.model}", CLIENT, None, _CURRENT.get())
        headers["traceparent"] = span.traceparent()
        if span.tracestate:
            headers["tracestate"] = span.tracestate
        else:  # a tracestate without a valid traceparent means nothing (W3C trace context)
            headers.pop("tracestate", None)
        if not span.is_recording():
            return NO_ATTEMPT  # sampled out: the backend still gets the trace and the decision
        span.set_attributes(self._attempt_attributes(ex, op, number, kind, target))
        return AttemptSpan(span, self.capture_content)

    def _attempt_attributes(self, ex: Exchange, op: str, number: int, kind: str,
                            target: BackendTarget) -> dict[str, Any]:
        body = ex.body
        server = self._servers.get(target.api_base)
        if server is None:
            parts = urlsplit(target.api_base)
            server = self._servers[target.api_base] = (parts.hostname or "",
                                                       parts.port or (443 if parts.scheme == "https" else 80))
        attrs: dict[str, Any] = {
            N.GEN_AI_OPERATION_NAME: op, N.GEN_AI_PROVIDER_NAME: N.PROVIDER.get(target.kind, target.kind),
            N.GEN_AI_REQUEST_MODEL: ex.model, N.GEN_AI_REQUEST_STREAM: ex.stream,
            N.SERVER_ADDRESS: server[0], N.SERVER_PORT: server[1],
            N.ATTEMPT_NUMBER: number, N.ATTEMPT_KIND: kind, N.ATTEMPT_ENDPOINT: target.name,
        }
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if isinstance(max_tokens, int) and not isinstance(max_tokens, bool):
            attrs[N.GEN_AI_REQUEST_MAX_TOKENS] = max_tokens
        for field_name, attr in (("temperature", N.GEN_AI_REQUEST_TEMPERATURE), ("top_p", N.GEN_AI_REQUEST_TOP_P)):
            v = body.get(field_name)
            if isinstance(v, int | float) and not isinstance(v, bool):
                attrs[attr] = float(v)
        seed = ex.pin_seed if ex.pin_seed is not None else body.get("seed")
        if isinstance(seed, int) and not isinstance(seed, bool):
            attrs[N.GEN_AI_REQUEST_SEED] = seed
        n = body.get("n")
        if isinstance(n, int) and not isinstance(n, bool) and n != 1:
            attrs[N.GEN_AI_REQUEST_CHOICE_COUNT] = n
        turn = ex.extras.get("state.turn")
        conversation = getattr(getattr(turn, "req", None), "conversation_id", None)
        previous = getattr(getattr(turn, "req", None), "previous_response_id", None)
        if isinstance(conversation, str):
            attrs[N.GEN_AI_CONVERSATION_ID] = conversation
        elif ex.routing.session_id and not ex.routing.session_id.startswith("thread:"):
            attrs[N.GEN_AI_CONVERSATION_ID] = ex.routing.session_id
        if isinstance(previous, str):
            attrs[N.GEN_AI_REQUEST_PREVIOUS_RESPONSE_ID] = previous
        if self.capture_content:
            attrs[N.GEN_AI_INPUT_MESSAGES] = _input_messages(body)
        return attrs


NOOP = Tracing()
"""Tracing off: every helper is a no-op."""
