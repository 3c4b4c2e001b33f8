"""Filter ``lora-capable``: endpoints that have the request's adapter registered or active, else any that load adapters.

A no-op for requests without an adapter.
"""
from __future__ import annotations

from routing.plugins.base import BuildContext, CycleContext, NoParams, PluginFactory
from routing.types import EndpointView

__all__ = ["FACTORY", "LoraCapableFilter"]


def _knows(e: EndpointView, lora: str) -> bool:
    m = e.metrics
    return lora in e.loras or (m is not None and (lora in m.loras_running or lora in m.loras_waiting))


class LoraCapableFilter:
    """Endpoints that have the adapter registered or active; failing that, any that can load adapters."""

    def __init__(self, name: str) -> None:
        self.name = name

    def filter(self, ctx: CycleContext, endpoints: list[EndpointView]) -> list[EndpointView]:
        lora = ctx.request.lora
        if lora is None:
            return endpoints
        known = [e for e in endpoints if _knows(e, lora)]
        if known:
            return known
        return [e for e in endpoints if e.metrics is not None and e.metrics.max_loras > 0]


def _build_filter(name: str, params: NoParams, deps: BuildContext) -> LoraCapableFilter:
    return LoraCapableFilter(name)


FACTORY = PluginFactory("lora-capable", "filter", NoParams, _build_filter, "endpoints able to serve the adapter")
