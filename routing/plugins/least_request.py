"""Scorer ``least-request-scorer`` (baseline): fewest gateway in-flight requests wins, nothing else.
"""
from __future__ import annotations

from collections.abc import Sequence

from routing.plugins.base import BuildContext, CycleContext, NoParams, PluginFactory
from routing.types import EndpointView

__all__ = ["FACTORY", "LeastRequestScorer"]


class LeastRequestScorer:
    def __init__(self, name: str) -> None:
        self.name = name

    def score(self, ctx: CycleContext, endpoints: Sequence[EndpointView]) -> list[float]:
        loads = [e.inflight_requests for e in endpoints]
        lo, hi = min(loads), max(loads)
        if hi == lo:
            return [1.0] * len(loads)
        return [(hi - x) / (hi - lo) for x in loads]


def _build(name: str, params: NoParams, deps: BuildContext) -> LeastRequestScorer:
    return LeastRequestScorer(name)


FACTORY = PluginFactory("least-request-scorer", "scorer", NoParams, _build, "fewest in-flight requests")
