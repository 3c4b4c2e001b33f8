"""Filter ``healthy``: drop endpoints that failed their last scrape, whose circuit is open, or whose metrics are stale.

An endpoint never scraped yet is kept, so a gateway without a collector still routes.
"""
from __future__ import annotations

from routing.plugins.base import BuildContext, CycleContext, Params, PluginFactory
from routing.types import EndpointView

__all__ = ["FACTORY", "HealthyFilter", "HealthyParams"]


class HealthyParams(Params):
    require_fresh_metrics: bool = True


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


FACTORY = PluginFactory("healthy", "filter", HealthyParams, _build, "healthy, circuit closed, metrics fresh")
