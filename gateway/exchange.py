"""One client request's journey through the gateway, shared by the pipeline, the dispatcher and telemetry."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from routing.types import Decision, RoutingRequest


@dataclass(slots=True)
class Exchange:
    request_id: str
    """The gateway's own id: the limiter, the backends and the logs know the request by it."""
    route: str
    """The OpenAI route without /v1, e.g. "chat/completions"."""
    model: str
    body: dict[str, Any]
    raw: bytes
    stream: bool
    client_wants_usage: bool
    routing: RoutingRequest
    forward_headers: dict[str, str]
    client_request_id: str | None = None
    """The client's own x-request-id when sane: echoed and logged, never an identity."""
    started: float = field(default_factory=time.perf_counter)
    tenant: str = "default"
    key_name: str | None = None
    """The accepted API key's name (never the key): the `key` label of metrics.key_label."""
    decision: Decision | None = None
    backend: str | None = None
    attempts: int = 0
    status: int = 0
    usage: dict[str, Any] | None = None
    first_chunk_at: float | None = None
    finished_at: float | None = None
    outcome: str = "pending"
    """ok | error | upstream_error | client_disconnect"""
    finished_sending: bool = False
    """The last body message is being sent: a "disconnect" after it is the end of the response."""
    resumable: bool = False
    pin_seed: int | None = None
    """A `seed` the gateway adds to every attempt of a resumable stream that came without one."""
    fallback_from: str | None = None
    """The model first asked for, when a fallback model answers."""
    response_headers: dict[str, str] = field(default_factory=dict)
    """Added to the client response (rate-limit headers and the like)."""
    extras: dict[str, Any] = field(default_factory=dict)
    """Per-request data of other layers (a rate-limit reservation, a span) keyed by owner."""
    settled: bool = False
    """Its budget was settled (or refunded): exactly once, whatever path the request took."""
    done: bool = False
    """`Pipeline.finish` ran (metrics recorded, budget settled)."""
    _upstream: bytes | None = None

    def upstream_body(self) -> bytes:
        """The bytes sent upstream: the client's own unless the gateway had to ask for usage or pin a seed."""
        if self._upstream is not None:
            return self._upstream
        out = self.raw
        ask_usage = self.stream and not self.client_wants_usage
        if ask_usage or self.pin_seed is not None:
            body = dict(self.body)
            if ask_usage:
                opts = body.get("stream_options")
                body["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
            if self.pin_seed is not None:
                body["seed"] = self.pin_seed
            out = orjson.dumps(body)
        self._upstream = out
        return out

    def replace_body(self, body: dict[str, Any], raw: bytes | None = None) -> None:
        """A layer changed what goes upstream (priority, a fallback model): keep the bytes in step."""
        self.body = body
        self.raw = raw if raw is not None else orjson.dumps(body)
        self._upstream = None
