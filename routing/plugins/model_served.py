"""Filter ``model-served``: keep endpoints whose discovered models (or LoRA adapters) include the request's.

The scheduler has already raised ModelNotServed when no endpoint at all serves it.
"""
from __future__ import annotations

from routing.plugins.base import BuildContext, CycleContext, NoParams, PluginFactory
from routing.types import EndpointView

__all__ = ["FACTORY", "ModelServedFilter"]


class ModelServedFilter:
    def __init__(self, name: str) -> None:
        self.name = name

    def filter(self, ctx: CycleContext, endpoints: list[EndpointView]) -> list[EndpointView]:
        model = ctx.request.model
        return [e for e in endpoints if e.serves(model)]


def _build(name: str, params: NoParams, deps: BuildContext) -> ModelServedFilter:
    return ModelServedFilter(name)


FACTORY = PluginFactory("model-served", "filter", NoParams, _build, "endpoints that serve the model")
