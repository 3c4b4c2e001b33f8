"""The scheduler's plugin protocols (Filter, Scorer, Picker, Observer) and what each call receives.

Implementations live one per module beside this file; the scheduler, not the plugins, clamps,
weights and sums scores and times every call.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from routing.datastore import Datastore
from routing.kv.state import KVEventState
from routing.types import Candidate, EndpointView, LatencyPrediction, PrefixMatch, RoutingRequest, Snapshot

__all__ = [
    "BuildContext",
    "CycleContext",
    "Filter",
    "NoParams",
    "Observer",
    "Params",
    "Picker",
    "PluginFactory",
    "Scorer",
]


@dataclass
class CycleContext:
    """One scheduling cycle: the request, the snapshot it runs over, and producers' typed outputs.

    A producer (the prefix scorer, the latency predictor) sets its field once; scorers later in the
    profile and the scheduler read it. ``None``: no producer ran in this profile.
    """

    request: RoutingRequest
    snapshot: Snapshot
    rng: random.Random
    prefix: PrefixMatch | None = None
    latency: LatencyPrediction | None = None


@dataclass(frozen=True)
class BuildContext:
    """What a plugin factory may depend on; nothing else is reachable from a plugin."""

    datastore: Datastore
    rng: random.Random
    clock: Callable[[], float]
    kv_events: KVEventState | None = None  # the event-fed block index, when the gateway subscribes to any


@runtime_checkable
class Filter(Protocol):
    name: str

    def filter(self, ctx: CycleContext, endpoints: list[EndpointView]) -> list[EndpointView]: ...


@runtime_checkable
class Scorer(Protocol):
    name: str

    def score(self, ctx: CycleContext, endpoints: Sequence[EndpointView]) -> Sequence[float]:
        """One score per endpoint, in order; the framework clamps each to [0, 1]."""
        ...


@runtime_checkable
class Picker(Protocol):
    name: str

    def pick(self, ctx: CycleContext, candidates: list[Candidate]) -> list[Candidate]:
        """Rank the candidates best first; every candidate must appear once."""
        ...


@runtime_checkable
class Observer(Protocol):
    """Plugins with state that learns from the final pick (prefix index, round-robin cursor)."""

    def observe(self, request: RoutingRequest, endpoint: str) -> None: ...


class Params(BaseModel):
    """Base of every plugin's parameter model: unknown keys are configuration mistakes."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(Params):
    pass


@dataclass(frozen=True)
class PluginFactory:
    """Registry entry: a type name, its parameter model and how to build an instance."""

    type_name: str
    kind: str  # "filter" | "scorer" | "picker"
    params: type[Params]
    build: Callable[[str, Any, BuildContext], Any]
    doc: str = ""
    # Behaviour version: bump when the plugin decides differently for the same params (its formula or a
    # param default changed), so evaluations cached under the old behaviour are not reused (the sweep's keys).
    version: int = 1
