"""The request's current span and its SERVER span: parenting by a context variable of the request's task.

The SERVER span is made current in `GatewayApp` (or the ext_proc decider), and everything the request
does runs in that task, so children find their parent here without it being passed through the layers.
"""
from __future__ import annotations

import contextvars
from collections.abc import MutableMapping
from typing import Any, Self

from gateway.errors import to_gateway_error
from gateway.telemetry import names as N
from gateway.telemetry.otlp import Shape
from gateway.telemetry.spans import error_type, mark_error

__all__ = ["CURRENT", "NO_SERVER", "ServerSpan", "current_trace_id"]

CURRENT: contextvars.ContextVar[Any] = contextvars.ContextVar("gravity_span", default=None)
"""The request's current span (its SERVER span); children are started under it."""

_ANSWER = Shape(N.HTTP_ROUTE, N.HTTP_RESPONSE_STATUS_CODE, cached=True)


def current_trace_id() -> str | None:
    """The trace id of the request being served (hex), None when tracing is off or outside a request."""
    span = CURRENT.get()
    return span.trace_id.hex() if span is not None else None


class _NoServer:
    """The SERVER span when tracing is off: nothing at all."""

    __slots__ = ()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


NO_SERVER = _NoServer()


class ServerSpan:
    """The request's SERVER span, current for the duration of the `with` block."""

    __slots__ = ("_route", "_scope", "_token", "span")

    def __init__(self, span: Any, scope: MutableMapping[str, Any] | None, route: str | None = None) -> None:
        self.span = span
        self._scope = scope
        """The ASGI scope: its matched route names the span, `state.response_status` is the answer's."""
        self._route = route
        """http.route as known at the start (None: the router's match decides it at the end)."""
        self._token: object = None

    def __enter__(self) -> Self:
        self._token = CURRENT.set(self.span)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        span = self.span
        try:
            scope = self._scope
            status = 0
            if scope is not None and span.is_recording():
                template = getattr(scope.get("route"), "path", None)
                route = self._route
                if isinstance(template, str):
                    if template != route:
                        span.update_name(f"{scope['method']} {template}")
                    route = template
                status = scope["state"].get("response_status") or 0
                if route is not None or status:
                    span.record(_ANSWER, (route, status or None))
            if isinstance(exc, Exception) and scope is None:
                # The ext_proc edge answers refusals itself: the error's status is the answer.
                failed = to_gateway_error(exc).status
                span.set_attribute(N.HTTP_RESPONSE_STATUS_CODE, failed)
                if failed >= 500:
                    mark_error(span, error_type(exc))
            elif exc is not None and not isinstance(exc, GeneratorExit):
                mark_error(span, error_type(exc))
            elif status >= 500:  # a 4xx is the client's error, not the server span's (HTTP conventions)
                mark_error(span, str(status))
            span.end()
        finally:
            CURRENT.reset(self._token)  # type: ignore[arg-type]
