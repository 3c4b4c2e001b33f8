"""Scorer ``queue-scorer``: prefer endpoints with less work queued (scraped waiting + gateway in-flight).

In-flight counts are immediate while scrapes lag, so a burst spreads out instead of landing on the
replica that looked idle 100 ms ago. A waiting request is counted in both terms on purpose: queued
work hurts time-to-first-token more than work already running.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from routing.plugins.base import BuildContext, CycleContext, Params, PluginFactory
from routing.types import EndpointView

__all__ = ["FACTORY", "QueueParams", "QueueScorer", "queue_depth"]


class QueueParams(Params):
    # minmax: relative to the best and worst candidate (GIE's semantics); absolute: 1/(1+q/scale),
    # so a difference of one request between idle replicas does not swamp the other scorers.
    mode: Literal["minmax", "absolute"] = "minmax"
    scale: float = Field(default=8.0, gt=0)


def queue_depth(e: EndpointView) -> float:
    m = e.trusted_metrics()
    return e.inflight_requests + (m.waiting if m is not None else 0)


class QueueScorer:
    def __init__(self, name: str, params: QueueParams) -> None:
        self.name = name
        self._p = params

    def score(self, ctx: CycleContext, endpoints: Sequence[EndpointView]) -> list[float]:
        depths = [queue_depth(e) for e in endpoints]
        if self._p.mode == "absolute":
            return [1.0 / (1.0 + d / self._p.scale) for d in depths]
        lo, hi = min(depths), max(depths)
        if hi == lo:
            return [1.0] * len(depths)
        return [(hi - d) / (hi - lo) for d in depths]


def _build(name: str, params: QueueParams, deps: BuildContext) -> QueueScorer:
    return QueueScorer(name, params)


FACTORY = PluginFactory("queue-scorer", "scorer", QueueParams, _build, "waiting + in-flight, lower is better")
