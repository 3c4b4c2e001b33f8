"""Scorer ``lora-affinity-scorer``: adapter running > waiting > loadable > none (GIE's ordering).

Scores 1 everywhere for requests without an adapter, so it never skews base-model traffic.
"""
from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from routing.plugins.base import BuildContext, CycleContext, Params, PluginFactory
from routing.types import EndpointView

__all__ = ["FACTORY", "LoraAffinityParams", "LoraAffinityScorer"]


class LoraAffinityParams(Params):
    running: float = Field(default=1.0, ge=0, le=1)
    waiting: float = Field(default=0.8, ge=0, le=1)
    loadable: float = Field(default=0.6, ge=0, le=1)


class LoraAffinityScorer:
    def __init__(self, name: str, params: LoraAffinityParams) -> None:
        self.name = name
        self._p = params

    def score(self, ctx: CycleContext, endpoints: Sequence[EndpointView]) -> list[float]:
        lora = ctx.request.lora
        if lora is None:
            return [1.0] * len(endpoints)
        return [self._one(e, lora) for e in endpoints]

    def _one(self, e: EndpointView, lora: str) -> float:
        m = e.trusted_metrics()
        if m is None:
            return self._p.loadable if lora in e.loras else 0.0
        if lora in m.loras_running:
            return self._p.running
        if lora in m.loras_waiting:
            return self._p.waiting
        if len(m.loras_running) < m.max_loras:
            return self._p.loadable
        return 0.0


def _build_scorer(name: str, params: LoraAffinityParams, deps: BuildContext) -> LoraAffinityScorer:
    return LoraAffinityScorer(name, params)


FACTORY = PluginFactory(
    "lora-affinity-scorer", "scorer", LoraAffinityParams, _build_scorer, "adapter running > waiting > loadable"
)
