"""Prometheus metrics of one gateway instance, kept in a registry of its own (no globals).

docs/metrics.md lists every series. The per-request ones are the lean families of
gateway/metric_families.py (a request updates a dozen of them).
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest

from gateway.metric_families import (
    MAX_SERIES,
    OVERFLOW,
    Child,
    CounterFamily,
    FamiliesCollector,
    Family,
    GaugeFamily,
    HistChild,
    HistogramFamily,
)

if TYPE_CHECKING:
    from gateway.exchange import Exchange
    from routing.types import Decision

__all__ = ["KEY_NONE", "KEY_OTHER", "MAX_SERIES", "OVERFLOW", "UNROUTED", "GatewayMetrics", "decided_by"]

UNROUTED = "_unrouted"
"""The model label of requests that never reached a backend: a client-chosen name must not
become a label value (unbounded cardinality)."""

KEY_OTHER = "other"
"""The `key` label of every key name past `metrics.key_label_max`."""

KEY_NONE = "_none"
"""The `key` label of requests no API key was accepted for (refused before or at authentication)."""

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# The GenAI semantic conventions' advisory boundaries for gen_ai.server.time_to_first_token and
# gen_ai.server.time_per_output_token, extended where a gateway sees more (queues, fast simulators).
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_PLUGIN_BUCKETS = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.05)
_REDIS_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_RATIO_BUCKETS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
CIRCUIT_STATES = ("closed", "open", "half_open")

class _Bundle:
    """The children one kind of exchange (route, model, backend, status, tenant) updates; those not every
    exchange updates (streams, usage) are made on first use, so no empty series is exported."""

    __slots__ = ("_key", "_m", "_tokens", "_ttft", "key_requests", "latency", "requests")

    def __init__(self, m: GatewayMetrics, route: str, model: str, backend: str, status: int, tenant: str,
                 key: str | None = None) -> None:
        self._m, self._key = m, (route, model, backend, str(status), tenant, key)
        self.requests = m.requests.labels(route, model, backend, str(status))
        self.latency = m.latency.labels(route, model, str(status))
        self.key_requests = None if key is None else m.key_requests.labels(tenant, key, str(status))
        self._ttft: tuple[HistChild, HistChild] | None = None
        self._tokens: dict[str, tuple[Child, Child | None]] = {}

    def ttft_tpot(self) -> tuple[HistChild, HistChild]:
        if self._ttft is None:
            route, model, backend, _, _, _ = self._key
            self._ttft = (self._m.ttft.labels(route, model, backend), self._m.tpot.labels(route, model, backend))
        return self._ttft

    def tokens(self, kind: str, n: int) -> None:
        pair = self._tokens.get(kind)
        if pair is None:
            _, model, backend, _, tenant, key = self._key
            tokens = self._m.tokens
            pair = self._tokens[kind] = (tokens.labels(tenant, model, kind) if key is None
                                         else tokens.labels(tenant, key, model, kind),
                                         self._m.backend_tokens.labels(backend, kind) if backend else None)
        pair[0].value += n
        if pair[1] is not None:
            pair[1].value += n


class _ProfileSeries:
    __slots__ = ("decisions", "plugins", "prefix", "schedule")

    def __init__(self, m: GatewayMetrics, profile: str) -> None:
        self.schedule = m.schedule_time.labels(profile)
        self.prefix = m.prefix_ratio.labels(profile)
        self.plugins: dict[str, HistChild] = {}
        self.decisions: dict[tuple[str, str], Child] = {}

class GatewayMetrics:
    """Every metric the gateway updates per request; `registry` also carries admission's own."""

    def __init__(self, key_label_max: int = 0) -> None:
        """`key_label_max` > 0: the `metrics.key_label` option (docs/metrics.md), that many key names labelled."""
        self.registry = CollectorRegistry(auto_describe=True)
        self._key_labels: dict[str, str] | None = {} if key_label_max > 0 else None
        """API key name -> its `key` label value, the first `key_label_max` names seen (None: option off)."""
        self._key_label_max = key_label_max
        self._families: list[Family] = []
        # -- requests -------------------------------------------------------------------------------
        self.requests = self.counter("gravity_requests", "API requests finished, by route, model, the backend "
                                     "that answered and HTTP status.", ["route", "model", "backend", "status"])
        self.latency = self.hist("gravity_request_duration_seconds", "Time from a request's arrival to its last "
                                 "byte (gen_ai.server.request.duration).", ["route", "model", "status"],
                                 _LATENCY_BUCKETS)
        self.inflight = self.gauge("gravity_requests_in_flight", "API requests (/v1/...) being served now, from "
                                   "arrival to the last byte.", []).labels()
        self.client_disconnects = self.counter("gravity_client_disconnects", "Requests the client abandoned.",
                                               ["route"])
        self.routing_errors = self.counter("gravity_routing_errors", "Requests no backend could take.",
                                           ["model", "code"])
        # -- GenAI latencies, as the gateway's client sees them -------------------------------------------
        self.ttft = self.hist("gravity_time_to_first_token_seconds", "Arrival to the first streamed chunk relayed, "
                              "for successful streams (gen_ai.server.time_to_first_token).",
                              ["route", "model", "backend"], _TTFT_BUCKETS)
        self.tpot = self.hist("gravity_time_per_output_token_seconds", "Per successful stream: (last byte - first "
                              "chunk) / (output tokens - 1) (gen_ai.server.time_per_output_token).",
                              ["route", "model", "backend"], _TPOT_BUCKETS)
        # -- tokens -------------------------------------------------------------------------------------
        keyed = self._key_labels is not None
        self.tokens = self.counter("gravity_tokens", "Tokens in backends' usage reports, by tenant, "
                                   + ("API key name, " if keyed else "") + "model and type "
                                   "(input, output, cached_input: the part of input read from the prefix cache).",
                                   ["tenant", "key", "model", "type"] if keyed else ["tenant", "model", "type"])
        # Declared either way (the bundles' code is one), exported only with the option on.
        declare = self.counter if keyed else CounterFamily
        self.key_requests = declare("gravity_key_requests", "API requests finished, by tenant, API key name and "
                                    "HTTP status (metrics.key_label).", ["tenant", "key", "status"])
        self.backend_tokens = self.counter("gravity_backend_tokens", "The same usage by the backend that answered "
                                           "(cached_input / input is the backend's prefix-cache hit rate).",
                                           ["backend", "type"])
        # -- routing ------------------------------------------------------------------------------------
        self.decisions = self.counter("gravity_routing_decisions", "Scheduler picks, by profile, endpoint picked "
                                      "and what decided it (see decided_by).", ["profile", "endpoint", "decided_by"])
        self.prefix_ratio = self.hist("gravity_prefix_match_ratio", "Fraction of the prompt the prefix producer "
                                      "believed cached on the endpoint picked.", ["profile"], _RATIO_BUCKETS)
        self.schedule_time = self.hist("gravity_scheduler_duration_seconds", "One scheduling decision, all plugins.",
                                       ["profile"], _PLUGIN_BUCKETS)
        self.plugin_time = self.hist("gravity_scheduler_plugin_duration_seconds", "Time in each filter, scorer and "
                                     "picker of a decision.", ["profile", "plugin"], _PLUGIN_BUCKETS)
        # -- attempts and resilience --------------------------------------------------------------------------
        self.upstream_errors = self.counter("gravity_upstream_errors", "Failed attempts to reach a backend.",
                                            ["backend", "reason"])
        self.attempts = self.counter("gravity_upstream_attempts", "Upstream attempts, by endpoint and kind "
                                     "(first, retry, resume).", ["backend", "kind"])
        self.retries = self.counter("gravity_upstream_retries", "Failed attempts that were retried elsewhere, by "
                                    "the endpoint that failed and how.", ["backend", "failure"])
        self.resumes = self.counter("gravity_stream_resumes", "Streams continued on another endpoint, by the "
                                    "endpoint that broke and how.", ["backend", "failure"])
        self.fallbacks = self.counter("gravity_model_fallbacks", "Requests answered by a fallback model.",
                                      ["model", "fallback"])
        self.circuit = self.gauge("gravity_circuit_state", "Circuit breaker state per endpoint (1 for the current "
                                  "state: closed, open, half_open).", ["backend", "state"])
        self.circuit_changes = self.counter("gravity_circuit_transitions", "Circuit breaker state changes, by the "
                                            "state entered.", ["backend", "state"])
        # -- admission ----------------------------------------------------------------------------------
        self.ratelimited = self.counter("gravity_ratelimit_rejections", "Requests refused by a rate limit, by the "
                                        "budget's scope (key, tenant, tenant_model) and limit (tpm, rpm, tpd, "
                                        "concurrency).", ["scope", "limit"])
        # -- Redis --------------------------------------------------------------------------------------
        self.redis_time = self.hist("gravity_redis_operation_duration_seconds", "Redis commands and scripts as the "
                                    "gateway waits for them, by operation.", ["operation"], _REDIS_BUCKETS)
        self.redis_errors = self.counter("gravity_redis_operation_errors", "Redis commands that failed, by "
                                         "operation and error class.", ["operation", "error"])
        self._bundles: dict[tuple[str, str, str, int, str, str | None], _Bundle] = {}
        self._profiles: dict[str, _ProfileSeries] = {}
        self.registry.register(FamiliesCollector(self._families))

    # -- declaring ------------------------------------------------------------------------------------
    def counter(self, name: str, doc: str, labelnames: Sequence[str]) -> Family:
        return self._add(CounterFamily(name, doc, labelnames))

    def gauge(self, name: str, doc: str, labelnames: Sequence[str]) -> Family:
        return self._add(GaugeFamily(name, doc, labelnames))

    def hist(self, name: str, doc: str, labelnames: Sequence[str], buckets: Iterable[float]) -> HistogramFamily:
        family = HistogramFamily(name, doc, labelnames, buckets)
        self._add(family)
        return family

    def _add(self, family: Family) -> Family:
        self._families.append(family)
        return family

    # -- recording ------------------------------------------------------------------------------------
    def observe(self, ex: Exchange) -> None:
        """Record one finished exchange (one dict lookup per group of series: this runs per request)."""
        backend = ex.backend or ""
        model = ex.model if backend else UNROUTED
        key = (ex.route, model, backend, ex.status, ex.tenant,
               None if self._key_labels is None else self._key_label(ex.key_name))
        b = self._bundles.get(key)
        if b is None:
            b = self._bundle(key)
        b.requests.value += 1
        if b.key_requests is not None:
            b.key_requests.value += 1
        started = ex.started
        end = ex.finished_at or started
        b.latency.observe(end - started)
        usage = ex.usage
        output = None
        if usage:
            prompt = usage.get("prompt_tokens")
            completion = usage.get("completion_tokens")
            details = usage.get("prompt_tokens_details")
            cached = details.get("cached_tokens") if type(details) is dict else None
            if type(prompt) is int and prompt >= 0:
                b.tokens("input", prompt)
            if type(completion) is int and completion >= 0:
                b.tokens("output", completion)
                output = completion
            if type(cached) is int and cached >= 0:
                b.tokens("cached_input", cached)
        first = ex.first_chunk_at
        if first is not None and ex.outcome == "ok":
            ttft, tpot = b.ttft_tpot()
            ttft.observe(first - started)
            if output is not None and output > 1:
                tpot.observe((end - first) / (output - 1))
        decision = ex.decision
        if decision is not None and decision.ranked:
            self._decision(decision)

    def _key_label(self, name: str | None) -> str:
        """The `key` label of an API key's name: its own for the first `key_label_max` names, then KEY_OTHER."""
        labels = self._key_labels
        assert labels is not None
        if name is None:
            return KEY_NONE
        label = labels.get(name)
        if label is None:
            if len(labels) >= self._key_label_max:
                return KEY_OTHER  # not remembered: the map stays bounded however many keys there are
            label = labels[name] = name or "_unnamed"
        return label

    def _bundle(self, key: tuple[str, str, str, int, str, str | None]) -> _Bundle:
        if len(self._bundles) >= 4 * MAX_SERIES:  # only a cache: the series stay in their families
            self._bundles.clear()
        b = self._bundles[key] = _Bundle(self, *key)
        return b

    def _decision(self, decision: Decision) -> None:
        profile = decision.profile
        p = self._profiles.get(profile)
        if p is None:
            p = self._profiles[profile] = _ProfileSeries(self, profile)
        picked = decision.ranked[0].endpoint
        reason = decided_by(decision)
        child = p.decisions.get((picked, reason))
        if child is None:
            child = p.decisions[(picked, reason)] = self.decisions.labels(profile, picked, reason)
        child.value += 1
        # The histograms' observe() inlined: a decision feeds one per plugin (eight or so per request).
        bisect_left = bisect.bisect_left
        h = p.schedule
        seconds = decision.latency_s
        h.counts[bisect_left(h.bounds, seconds)] += 1
        h.value += seconds
        plugins = p.plugins
        for plugin, seconds in decision.timings.items():
            h = plugins.get(plugin)  # type: ignore[assignment]
            if h is None:
                h = plugins[plugin] = self.plugin_time.labels(profile, plugin)
            h.counts[bisect_left(h.bounds, seconds)] += 1
            h.value += seconds
        prefix = decision.prefix
        if prefix is not None:
            p.prefix.observe(prefix.fraction(picked))

    def unexchanged(self, route: str, status: int, seconds: float) -> None:
        """An API request answered before the pipeline made an exchange of it (a bad body, state CRUD)."""
        self.requests.labels(route, UNROUTED, "", str(status)).inc()
        self.latency.labels(route, UNROUTED, str(status)).observe(seconds)

    def backend_configured(self, backend: str) -> None:
        """Series that exist from start-up for each backend, so rates and dashboards start from 0."""
        self.circuit_state(backend, "closed")
        for s in CIRCUIT_STATES:
            self.circuit_changes.labels(backend, s)

    def circuit_state(self, backend: str, state: str) -> None:
        for s in CIRCUIT_STATES:
            self.circuit.labels(backend, s).set(1 if s == state else 0)

    def circuit_changed(self, backend: str, state: str) -> None:
        self.circuit_state(backend, state)
        self.circuit_changes.labels(backend, state).inc()

    def rate_limited(self, scope: str | None, limit: str) -> None:
        """`scope`: the refusing budget's label ("key", "tenant", "tenant model")."""
        self.ratelimited.labels((scope or "unknown").replace(" ", "_"), limit or "unknown").inc()

    def redis_op(self, operation: str, seconds: float, error: BaseException | None = None) -> None:
        self.redis_time.labels(operation).observe(seconds)
        if error is not None:
            self.redis_errors.labels(operation, type(error).__name__).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def decided_by(decision: object) -> str:
    """What made the picked endpoint win: the scorer whose weighted score put it furthest ahead of the
    runner-up; `only_candidate` when filters left one, `tie` when the best totals were equal (the picker
    chose among them), `picker` when the picker chose an endpoint that was not the best scored."""
    ranked = getattr(decision, "ranked", None)
    if not ranked:
        return "none"
    if len(ranked) == 1:
        return "only_candidate"
    winner = ranked[0]
    won = _total(winner)
    others = max(_total(c) for c in ranked[1:])
    if others > won:
        return "picker"  # an endpoint scored above the one picked
    if not won > others:
        return "tie"
    weights: Sequence[tuple[str, float]] = getattr(decision, "weights", ()) or ()
    if not weights:
        return "score"
    runner = next(c for c in ranked[1:] if _total(c) == others)
    mine, theirs = winner.scores, runner.scores
    top, lead = "score", 0.0
    for name, weight in weights:
        diff = mine.get(name, 0.0) - theirs.get(name, 0.0)
        if diff <= 0:
            continue
        margin = math.inf if math.isinf(weight) else weight * diff
        if margin > lead:
            top, lead = name, margin
    return top


def _total(candidate: object) -> float:
    score = float(getattr(candidate, "score", 0.0))
    return -math.inf if math.isnan(score) else score
