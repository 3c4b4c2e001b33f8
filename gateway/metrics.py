"""Prometheus metrics of one gateway instance, kept in a registry of its own (no globals)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from gateway.exchange import Exchange

UNROUTED = "_unrouted"
"""The model label of requests that never reached a backend: a client-chosen name must not
become a label value (unbounded cardinality)."""

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("gravity_requests", "Requests finished, by route, model, backend and status.",
                                ["route", "model", "backend", "status"], registry=r)
        self.latency = Histogram("gravity_request_duration_seconds", "Time from request to last byte.",
                                 ["route", "model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("gravity_time_to_first_token_seconds", "Time to the first streamed chunk.",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("gravity_tokens", "Tokens reported by backends' usage.",
                              ["model", "kind"], registry=r)
        self.cached_tokens = Counter("gravity_cached_prompt_tokens", "Prompt tokens served from a backend's "
                                     "prefix cache (usage.prompt_tokens_details.cached_tokens).",
                                     ["model", "backend"], registry=r)
        self.upstream_errors = Counter("gravity_upstream_errors", "Failed attempts to reach a backend.",
                                       ["backend", "reason"], registry=r)
        self.routing_errors = Counter("gravity_routing_errors", "Requests no backend could take.",
                                      ["model", "code"], registry=r)
        self.inflight = Gauge("gravity_requests_in_flight", "API requests (/v1/...) being served now, from arrival to the last byte.", registry=r)
        self.client_disconnects = Counter("gravity_client_disconnects", "Requests the client abandoned.",
                                          ["route"], registry=r)
        self.attempts = Counter("gravity_upstream_attempts", "Upstream attempts, by endpoint and kind "
                                "(first, retry, resume).", ["backend", "kind"], registry=r)
        self.retries = Counter("gravity_upstream_retries", "Failed attempts that were retried elsewhere, by the "
                               "endpoint that failed and how.", ["backend", "failure"], registry=r)
        self.resumes = Counter("gravity_stream_resumes", "Streams continued on another endpoint, by the endpoint "
                               "that broke and how.", ["backend", "failure"], registry=r)
        self.fallbacks = Counter("gravity_model_fallbacks", "Requests answered by a fallback model.",
                                 ["model", "fallback"], registry=r)
        self.circuit = Gauge("gravity_circuit_state", "Circuit breaker state per endpoint (1 for the current "
                             "state: closed, open, half_open).", ["backend", "state"], registry=r)

        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        # prometheus_client's labels() validates and locks on every call; children are stable.
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe(self, ex: Exchange) -> None:
        """Record one finished exchange."""
        model = ex.model if ex.backend else UNROUTED
        self._child(self.requests, ex.route, model, ex.backend or "", str(ex.status)).inc()
        end = ex.finished_at or ex.started
        self._child(self.latency, ex.route, model).observe(end - ex.started)
        if ex.first_chunk_at is not None:
            self._child(self.ttft, model).observe(ex.first_chunk_at - ex.started)
        usage = ex.usage
        if usage:
            prompt = usage.get("prompt_tokens")
            completion = usage.get("completion_tokens")
            if isinstance(prompt, int):
                self._child(self.tokens, model, "prompt").inc(prompt)
            if isinstance(completion, int):
                self._child(self.tokens, model, "completion").inc(completion)
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                self._child(self.cached_tokens, model, ex.backend or "").inc(details["cached_tokens"])

    def circuit_state(self, backend: str, state: str) -> None:
        for s in ("closed", "open", "half_open"):
            self._child(self.circuit, backend, s).set(1 if s == state else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
