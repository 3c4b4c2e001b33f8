"""Scorer ``kv-cache-utilization-scorer``: prefer endpoints with free KV cache (1 - usage).

Unknown or stale usage scores 0.5 so it neither attracts nor repels.
"""
from __future__ import annotations

from collections.abc import Sequence

from routing.plugins.base import BuildContext, CycleContext, NoParams, PluginFactory
from routing.types import EndpointView

__all__ = ["FACTORY", "KVCacheScorer"]


class KVCacheScorer:
    def __init__(self, name: str) -> None:
        self.name = name

    def score(self, ctx: CycleContext, endpoints: Sequence[EndpointView]) -> list[float]:
        out = []
        for e in endpoints:
            m = e.trusted_metrics()
            out.append(0.5 if m is None or m.kv_usage is None else 1.0 - m.kv_usage)
        return out


def _build(name: str, params: NoParams, deps: BuildContext) -> KVCacheScorer:
    return KVCacheScorer(name)


FACTORY = PluginFactory("kv-cache-utilization-scorer", "scorer", NoParams, _build, "1 - KV cache usage")
