"""Scorer ``load-guard-scorer``: 1 for endpoints near the least-loaded one, falling to 0 for saturated ones.

Weighted above the affinity scorers it stops a hot prefix or session from piling onto one replica:
once that replica is ``abs_threshold`` requests busier than the idlest, affinity stops winning.
"""
from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from routing.plugins.base import BuildContext, CycleContext, Params, PluginFactory
from routing.plugins.queue import queue_depth
from routing.types import EndpointView

__all__ = ["FACTORY", "LoadGuardParams", "LoadGuardScorer"]


class LoadGuardParams(Params):
    abs_threshold: float = Field(default=8.0, gt=0, description="queue excess over the idlest that is tolerated")
    rel_threshold: float = Field(default=1.5, ge=1, description="and the ratio to the idlest that is tolerated")
    kv_threshold: float = Field(default=0.95, gt=0, le=1, description="KV usage above which an endpoint is saturated")


class LoadGuardScorer:
    def __init__(self, name: str, params: LoadGuardParams) -> None:
        self.name = name
        self._p = params

    def score(self, ctx: CycleContext, endpoints: Sequence[EndpointView]) -> list[float]:
        p = self._p
        depths = [queue_depth(e) for e in endpoints]
        floor = min(depths)
        abs_threshold, kv_threshold, rel_floor = p.abs_threshold, p.kv_threshold, floor * p.rel_threshold
        out = []
        for e, d in zip(endpoints, depths, strict=True):
            excess = d - floor
            if excess <= 0:  # the idlest: neither saturated-and-busier nor over a threshold
                out.append(1.0)
                continue
            m = e.trusted_metrics()
            if m is not None and m.kv_usage is not None and m.kv_usage >= kv_threshold:
                out.append(0.0)
            elif excess <= abs_threshold or d <= rel_floor:
                out.append(1.0)
            else:
                # Linear fall-off over a second threshold's width, so the switch is not a cliff.
                out.append(max(0.0, 1.0 - (excess - abs_threshold) / abs_threshold))
        return out


def _build(name: str, params: LoadGuardParams, deps: BuildContext) -> LoadGuardScorer:
    return LoadGuardScorer(name, params)


FACTORY = PluginFactory("load-guard-scorer", "scorer", LoadGuardParams, _build, "0 for saturated endpoints")
