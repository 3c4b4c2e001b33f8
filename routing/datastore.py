"""The endpoint datastore: the single writer of backend state (specs, models, health, metrics, in-flight).

Scheduling reads immutable :class:`Snapshot` copies; only the collector, the gateway and the
resilience layer write, and always through these methods.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from routing.latency import DRAIN_RATE_FRACTION, PRIOR, TTFTCoefficients, TTFTModel
from routing.types import EndpointMetrics, EndpointSpec, EndpointView, Snapshot, pending_prefill

__all__ = ["Datastore", "InflightListener", "InflightTicket", "RestartListener"]

RestartListener = Callable[[str], None]
InflightListener = Callable[[str], None]
"""Told an endpoint's name each time this process's own in-flight counts for it change."""
_RATE_SMOOTHING = 0.2  # weight of a new prefill-rate sample in the moving average
_RATE_MAX_RISE = 1.1  # a sample above this multiple of the average counts as this multiple


@dataclass
class InflightTicket:
    """Handle returned by :meth:`Datastore.begin`; ending it twice is harmless."""

    endpoint: str
    prompt_tokens: int
    max_tokens: int
    generation: int
    done: bool = False
    prefilled: bool = False
    # What the TTFT model is fitted on: when the request was dispatched and its features then.
    started_at: float = 0.0
    tokens_ahead: float = 0.0
    inflight_ahead: int = 0


@dataclass
class _State:
    spec: EndpointSpec
    models: frozenset[str] | None
    loras: frozenset[str] = frozenset()
    lora_bases: dict[str, str] = dataclasses.field(default_factory=dict)  # adapter -> its base model
    healthy: bool = True  # optimistic until a scrape says otherwise, so static setups work
    health_reason: str = ""
    circuit_open: bool = False
    metrics: EndpointMetrics | None = None
    inflight_requests: int = 0
    inflight_prompt_tokens: int = 0
    inflight_decode_tokens: int = 0
    # Other gateway replicas' in-flight requests and prompt tokens awaiting prefill here, as shared
    # through Redis (gateway/state/inflight.py) at this replica's last pre-dispatch read; 0 alone.
    foreign_requests: int = 0
    foreign_prompt_tokens: int = 0
    # Peak of own + foreign in-flight requests since the last scrape, and as it was at that scrape.
    inflight_peak: int = 0
    inflight_at_scrape: int = 0
    # The current prefill busy period (prompt tokens awaiting prefill never dropped to zero since):
    # when it began and the prompt tokens dispatched in it, from which the prefill rate is measured;
    # and the anchor of the backlog estimate: the last first token (or the period's start) and the
    # prompt tokens pending then plus those dispatched since.
    prefill_busy_since: float = 0.0
    prefill_busy_tokens: int = 0
    prefill_tokens_per_s: float = 0.0  # moving average of the rate seen in busy periods; 0 until measured
    prefill_anchor_at: float = 0.0
    prefill_anchor_tokens: int = 0
    generation: int = 0
    restarts: int = 0
    ttft_model: TTFTModel = dataclasses.field(default_factory=TTFTModel)
    ttft: TTFTCoefficients = PRIOR  # ttft_model's coefficients as of its last update (views copy them)
    view: EndpointView | None = None  # cached immutable copy; None after any write to this state


class Datastore:
    """Holds every endpoint's state; all methods are O(1) except snapshot/describe (O(endpoints)).

    ``snapshot()`` is on every request's path, so it is cached: each write drops the written
    endpoint's cached view and the snapshot, and the next ``snapshot()`` rebuilds only what changed
    (in-flight accounting touches one endpoint per call, so that is one or two views per request).
    The snapshot is also rebuilt once the clock passes the moment a fresh metric turns stale.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, stale_after_s: float = 2.0) -> None:
        self._clock = clock
        self._stale_after_s = stale_after_s
        self._states: dict[str, _State] = {}
        self._restart_listeners: list[RestartListener] = []
        self._inflight_listeners: list[InflightListener] = []
        self._snap: Snapshot | None = None
        self._snap_valid_until = 0.0

    def _dirty(self, state: _State | None = None) -> None:
        if state is not None:
            state.view = None
        self._snap = None

    # -- configuration -------------------------------------------------------------------------
    def upsert(self, spec: EndpointSpec) -> None:
        current = self._states.get(spec.name)
        if current is None:
            self._states[spec.name] = _State(spec=spec, models=spec.models)
            self._dirty()
            return
        self._dirty(current)
        current.spec = spec
        if spec.models is not None:
            current.models = spec.models

    def remove(self, name: str) -> None:
        if self._states.pop(name, None) is not None:
            self._dirty()
            # A removed endpoint's cache is gone as far as routing is concerned.
            self._notify_restart(name)

    def specs(self) -> list[EndpointSpec]:
        return [s.spec for s in self._states.values()]

    def __contains__(self, name: object) -> bool:
        return name in self._states

    # -- writers -------------------------------------------------------------------------------
    def set_models(self, name: str, models: set[str] | frozenset[str], loras: set[str] | frozenset[str] = frozenset(),
                   bases: Mapping[str, str] | None = None) -> None:
        """What ``name`` serves: base models, LoRA adapters and (``bases``) each adapter's base model."""
        state = self._states.get(name)
        if state is None:
            return
        self._dirty(state)
        state.models = frozenset(models)
        state.loras = frozenset(loras)
        state.lora_bases = dict(bases or {})

    def set_healthy(self, name: str, ok: bool, reason: str = "") -> None:
        state = self._states.get(name)
        if state is None:
            return
        self._dirty(state)
        state.healthy = ok
        state.health_reason = "" if ok else reason

    def set_circuit_open(self, name: str, is_open: bool) -> None:
        """Written by the resilience layer's circuit breaker; the healthy filter honours it."""
        state = self._states.get(name)
        if state is not None:
            self._dirty(state)
            state.circuit_open = is_open

    def update_metrics(self, name: str, m: EndpointMetrics) -> None:
        state = self._states.get(name)
        if state is None:
            return
        self._dirty(state)
        previous = state.metrics
        state.metrics = dataclasses.replace(m, updated_at=self._clock())
        state.inflight_at_scrape = state.inflight_peak
        state.inflight_peak = state.inflight_requests + state.foreign_requests
        if previous is not None and _restarted(previous, m):
            self.on_restart(name)

    # -- restart handling ----------------------------------------------------------------------
    def add_restart_listener(self, listener: RestartListener) -> None:
        """Plugins holding per-endpoint cache state (the prefix index) register here."""
        self._restart_listeners.append(listener)

    def on_restart(self, name: str) -> None:
        """An endpoint restarted: its KV cache is empty, so everything we believed about it goes."""
        state = self._states.get(name)
        if state is not None:
            self._dirty(state)
            state.generation += 1
            state.restarts += 1
        self._notify_restart(name)

    def _notify_restart(self, name: str) -> None:
        for listener in self._restart_listeners:
            listener(name)

    # -- in-flight accounting ------------------------------------------------------------------
    def begin(self, name: str, prompt_tokens: int, max_tokens: int) -> InflightTicket:
        state = self._states.get(name)
        now = self._clock()
        ticket = InflightTicket(name, prompt_tokens, max_tokens, -1, started_at=now)
        if state is not None:
            self._dirty(state)
            ticket.tokens_ahead = prompt_tokens + state.foreign_prompt_tokens + pending_prefill(
                state.inflight_prompt_tokens, state.prefill_tokens_per_s * DRAIN_RATE_FRACTION,
                state.prefill_anchor_at, state.prefill_anchor_tokens, now)
            ticket.inflight_ahead = state.inflight_requests + state.foreign_requests
            if state.inflight_prompt_tokens == 0:
                state.prefill_busy_since = state.prefill_anchor_at = now
                state.prefill_busy_tokens = state.prefill_anchor_tokens = 0
            state.prefill_busy_tokens += prompt_tokens
            state.prefill_anchor_tokens += prompt_tokens
            state.inflight_requests += 1
            state.inflight_peak = max(state.inflight_peak, state.inflight_requests + state.foreign_requests)
            state.inflight_prompt_tokens += prompt_tokens
            state.inflight_decode_tokens += max_tokens
            ticket.generation = state.generation
            self._notify_inflight(name)
        return ticket

    def first_token(self, ticket: InflightTicket) -> None:
        """Optional: the first token arrived, so the prompt no longer waits for prefill.

        Callers that report it make ``inflight_prompt_tokens`` mean *prompt tokens awaiting prefill*,
        the load signal that best predicts time-to-first-token.
        """
        if ticket.done or ticket.prefilled:
            return
        ticket.prefilled = True
        state = self._states.get(ticket.endpoint)
        if state is not None:
            self._dirty(state)
            state.inflight_prompt_tokens = max(0, state.inflight_prompt_tokens - ticket.prompt_tokens)
            # Prefill rate as realised since the busy period began (queueing behind a running step
            # included, so it errs low): what lets a scorer tell a backlog about to finish from a new one.
            now = self._clock()
            if ticket.generation == state.generation:
                state.ttft_model.update(ticket.tokens_ahead, ticket.inflight_ahead, now - ticket.started_at)
                state.ttft = state.ttft_model.coefficients
            # Re-anchor the backlog estimate on every completion, so an error in the rate cannot
            # accumulate over a long busy period; what is still pending is assumed not yet started.
            state.prefill_anchor_at = now
            state.prefill_anchor_tokens = state.inflight_prompt_tokens
            elapsed = now - state.prefill_busy_since
            done = state.prefill_busy_tokens - state.inflight_prompt_tokens
            if elapsed > 0 and done > 0:
                sample = done / elapsed
                rate = state.prefill_tokens_per_s
                if rate > 0:
                    # A prompt the endpoint had cached beyond our estimate finishes "impossibly" fast;
                    # let the rate creep up but fall at once, so surprises cannot make a backlog vanish.
                    sample = min(sample, _RATE_MAX_RISE * rate)
                state.prefill_tokens_per_s = sample if rate == 0 else rate + _RATE_SMOOTHING * (sample - rate)
            self._notify_inflight(ticket.endpoint)

    def end(self, ticket: InflightTicket) -> None:
        if ticket.done:
            return
        ticket.done = True
        state = self._states.get(ticket.endpoint)
        if state is None:
            return
        self._dirty(state)
        # Clamp at zero: an endpoint removed and re-added between begin and end must not go negative.
        state.inflight_requests = max(0, state.inflight_requests - 1)
        if not ticket.prefilled:
            state.inflight_prompt_tokens = max(0, state.inflight_prompt_tokens - ticket.prompt_tokens)
        state.inflight_decode_tokens = max(0, state.inflight_decode_tokens - ticket.max_tokens)
        self._notify_inflight(ticket.endpoint)

    # -- in-flight shared between gateway replicas ---------------------------------------------
    def add_inflight_listener(self, listener: InflightListener) -> None:
        """The shared in-flight publisher registers here (each change of this process's own counts)."""
        self._inflight_listeners.append(listener)

    def _notify_inflight(self, name: str) -> None:
        for listener in self._inflight_listeners:
            listener(name)

    def own_inflight(self, name: str) -> tuple[int, int]:
        """This process's own (requests, prompt tokens awaiting prefill) on ``name``: what it shares."""
        state = self._states.get(name)
        return (0, 0) if state is None else (state.inflight_requests, state.inflight_prompt_tokens)

    def set_foreign_inflight(self, counts: Mapping[str, tuple[int, int]]) -> None:
        """Other replicas' (requests, prompt tokens awaiting prefill) per endpoint; endpoints absent
        from ``counts`` have none. Views include them from the next snapshot on."""
        for name, state in self._states.items():
            n, tokens = counts.get(name, (0, 0))
            if n != state.foreign_requests or tokens != state.foreign_prompt_tokens:
                self._dirty(state)
                state.foreign_requests, state.foreign_prompt_tokens = n, tokens
                state.inflight_peak = max(state.inflight_peak, state.inflight_requests + n)
    # -- readers -------------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """An immutable copy of every endpoint; the same object until the next write (``taken_at``
        is when it was built)."""
        now = self._clock()
        snap = self._snap
        if snap is not None and snap.taken_at <= now <= self._snap_valid_until:
            return snap
        stale_after = self._stale_after_s
        valid_until = float("inf")
        views: dict[str, EndpointView] = {}
        for name, s in self._states.items():
            m = s.metrics
            fresh = m is not None and now - m.updated_at <= stale_after
            if fresh:
                valid_until = min(valid_until, m.updated_at + stale_after)  # type: ignore[union-attr]
            view = s.view
            if view is None or view.fresh != fresh:
                view = s.view = self._view(s, now)
            views[name] = view
        self._snap = snap = Snapshot(endpoints=views, taken_at=now)
        self._snap_valid_until = valid_until
        return snap

    def _view(self, s: _State, now: float) -> EndpointView:
        fresh = s.metrics is not None and now - s.metrics.updated_at <= self._stale_after_s
        return EndpointView(
            name=s.spec.name,
            url=s.spec.url,
            models=s.models,
            loras=s.loras,
            healthy=s.healthy,
            health_reason=s.health_reason,
            circuit_open=s.circuit_open,
            metrics=s.metrics,
            fresh=fresh,
            inflight_requests=s.inflight_requests + s.foreign_requests,
            inflight_prompt_tokens=s.inflight_prompt_tokens,
            inflight_decode_tokens=s.inflight_decode_tokens,
            foreign_requests=s.foreign_requests,
            foreign_prompt_tokens=s.foreign_prompt_tokens,
            inflight_at_scrape=s.inflight_at_scrape,
            prefill_anchor_at=s.prefill_anchor_at,
            prefill_anchor_tokens=s.prefill_anchor_tokens,
            prefill_tokens_per_s=s.prefill_tokens_per_s,
            ttft=s.ttft,
            generation=s.generation,
        )

    def adapter_base(self, model: str) -> str | None:
        """The base model under ``model`` when ``model`` names a LoRA adapter some endpoint lists, else None.

        A name that is a base model anywhere is a base model; an adapter's base is the ``parent`` its
        endpoint's /v1/models gives, or that endpoint's only base model.
        """
        base: str | None = None
        for s in self._states.values():
            if s.models is not None and model in s.models:
                return None
            if base is None and model in s.loras:
                base = s.lora_bases.get(model) or (next(iter(s.models)) if s.models and len(s.models) == 1 else None)
        return base

    def served_models(self) -> set[str]:
        out: set[str] = set()
        for s in self._states.values():
            if s.healthy and s.models is not None:
                out |= s.models
                out |= s.loras
        return out

    def metrics_of(self, name: str) -> EndpointMetrics | None:
        state = self._states.get(name)
        return None if state is None else state.metrics

    def models_of(self, name: str) -> frozenset[str] | None:
        state = self._states.get(name)
        return None if state is None else state.models

    def describe(self) -> dict[str, Any]:
        """JSON-ready state for ``GET /admin/backends``."""
        now = self._clock()
        out: dict[str, Any] = {}
        for name, s in self._states.items():
            view = self._view(s, now)
            metrics: dict[str, Any] | None = None
            if s.metrics is not None:
                metrics = dataclasses.asdict(s.metrics)
                metrics["loras_running"] = sorted(s.metrics.loras_running)
                metrics["loras_waiting"] = sorted(s.metrics.loras_waiting)
                metrics["age_s"] = round(now - s.metrics.updated_at, 3)
                del metrics["updated_at"]
            out[name] = {
                "url": s.spec.url,
                "models": None if s.models is None else sorted(s.models),
                "loras": sorted(s.loras),
                "healthy": s.healthy,
                "reason": s.health_reason,
                "circuit_open": s.circuit_open,
                "fresh": view.fresh,
                "metrics": metrics,
                "inflight": {
                    "requests": s.inflight_requests,
                    "prompt_tokens": s.inflight_prompt_tokens,
                    "decode_tokens": s.inflight_decode_tokens,
                    "other_replicas": {"requests": s.foreign_requests, "prompt_tokens": s.foreign_prompt_tokens},
                },
                "restarts": s.restarts,
            }
        return out


def _restarted(old: EndpointMetrics, new: EndpointMetrics) -> bool:
    if None not in (old.process_start_time, new.process_start_time) and (
        new.process_start_time != old.process_start_time
    ):
        return True
    for before, after in (
        (old.prefix_queries_total, new.prefix_queries_total),
        (old.prefix_hits_total, new.prefix_hits_total),
        (old.requests_total, new.requests_total),
    ):
        if before is not None and after is not None and after < before:
            return True
    return False
