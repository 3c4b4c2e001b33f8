"""Prometheus metrics of one gateway instance, kept in a registry of its own (no globals)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
        self.inflight = Gauge("gravity_requests_in_flight", "Requests being served now.", registry=r)
        self.client_disconnects = Counter("gravity_client_disconnects", "Requests the client abandoned.",
                                          ["route"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
