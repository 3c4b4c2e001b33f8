"""One client request's journey through the gateway, shared by the proxy, policies and telemetry."""
from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from routing.types import Decision, RoutingRequest


@dataclass(slots=True)
class Exchange:
    request_id: str
    route: str
    """The OpenAI route without /v1, e.g. "chat/completions"."""
    model: str
    body: dict[str, Any]
    raw: bytes
    stream: bool
    client_wants_usage: bool
    routing: RoutingRequest
    forward_headers: dict[str, str]
    started: float = field(default_factory=time.perf_counter)
    tenant: str = "default"
    decision: Decision | None = None
    backend: str | None = None
    attempts: int = 0
    status: int = 0
    usage: dict[str, Any] | None = None
    first_chunk_at: float | None = None
    finished_at: float | None = None
    outcome: str = "pending"
    """ok | error | upstream_error | client_disconnect"""
    response_headers: dict[str, str] = field(default_factory=dict)
    """Added to the client response (rate-limit headers and the like)."""
    extras: dict[str, Any] = field(default_factory=dict)
    """Per-request data of other layers (a rate-limit reservation, a span) keyed by owner."""

    def upstream_body(self) -> bytes:
        """The bytes sent upstream: the client's own unless the gateway had to ask for usage."""
        if self.stream and not self.client_wants_usage:
            opts = self.body.get("stream_options")
            merged = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
            return orjson.dumps({**self.body, "stream_options": merged})
        return self.raw


FinishHook = Callable[[Exchange], Awaitable[None]]
PreDispatchHook = Callable[[Exchange, Mapping[str, str]], Awaitable[None]]
IdentifyHook = Callable[[Mapping[str, str]], Awaitable[str]]


class Lifecycle(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...
