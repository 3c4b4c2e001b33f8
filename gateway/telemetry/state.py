"""Spans for the state store's Responses and Conversations operations (one per Redis script or command).

`traced_store_class(tracing)` is a StateStore subclass whose operations each run in a CLIENT span
`gravity.state {operation}`; the composition root uses it only when tracing is on. Session reads and
writes are left out: they ride the rate limiter's round trip and show as `gravity.route.session_hit`.
"""
from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.state.store import StateStore
from gateway.telemetry import names as N
from gateway.telemetry.spans import CLIENT
from gateway.telemetry.tracing import Tracing

__all__ = ["STATE_OPERATIONS", "traced_store_class"]

STATE_OPERATIONS = (
    "history", "get_response", "response_input", "delete_response", "save_response", "begin_conversation",
    "renew_conversation", "release_conversation", "create_conversation", "append_items", "get_conversation",
    "update_conversation", "delete_conversation", "list_items", "get_item", "delete_item",
)


def _traced(tracing: Tracing, name: str, method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    attributes = {N.DB_SYSTEM_NAME: "redis", N.DB_OPERATION_NAME: name, N.STATE_OPERATION: name}
    span_name = N.SPAN_STATE_PREFIX + name

    @functools.wraps(method)
    async def traced(self: StateStore, *args: Any, **kwargs: Any) -> Any:
        with tracing.span(span_name, attributes, CLIENT):
            return await method(self, *args, **kwargs)
    return traced


def traced_store_class(tracing: Tracing) -> type[StateStore]:
    if not tracing.enabled:
        return StateStore
    ns = {name: _traced(tracing, name, getattr(StateStore, name)) for name in STATE_OPERATIONS}
    return type("TracedStateStore", (StateStore,), ns)
