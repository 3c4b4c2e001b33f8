"""Filter ``healthy``: drop endpoints marked unhealthy (failed scrapes or health probes, a refused
connection) or whose circuit is open.

Stale metrics mean "load unknown", not "dead": liveness is the health prober's (and, without probes,
the collector's) to judge, so by default an endpoint whose scrapes are slow keeps serving (its load
figures then count as absent). ``require_fresh_metrics: true`` drops stale endpoints instead.
"""
from __future__ import annotations

from routing.plugins.base import BuildContext, CycleContext, Params, PluginFactory
from routing.types import EndpointView

__all__ = ["FACTORY", "HealthyFilter", "HealthyParams"]


class HealthyParams(Params):
    require_fresh_metrics: bool = False


class HealthyFilter:
    def __init__(self, name: str, params: HealthyParams) -> None:
        self.name = name
        self._require_fresh = params.require_fresh_metrics

    def filter(self, ctx: CycleContext, endpoints: list[EndpointView]) -> list[EndpointView]:
        return [e for e in endpoints if self._ok(e)]

    def _ok(self, e: EndpointView) -> bool:
        if not e.healthy or e.circuit_open:
            return False
        return not (self._require_fresh and e.metrics is not None and not e.fresh)


def _build(name: str, params: HealthyParams, deps: BuildContext) -> HealthyFilter:
    return HealthyFilter(name, params)


FACTORY = PluginFactory("healthy", "filter", HealthyParams, _build, "healthy, circuit closed")
