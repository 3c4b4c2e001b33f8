"""Scorer ``session-affinity-scorer``: 1 for the endpoint this session last used, 0 elsewhere.

The gateway looks the session up (Redis) and passes it as ``RoutingRequest.session_endpoint``.
"""
from __future__ import annotations

from collections.abc import Sequence

from routing.plugins.base import BuildContext, CycleContext, NoParams, PluginFactory
from routing.types import EndpointView

__all__ = ["FACTORY", "SessionAffinityScorer"]


class SessionAffinityScorer:
    def __init__(self, name: str) -> None:
        self.name = name

    def score(self, ctx: CycleContext, endpoints: Sequence[EndpointView]) -> list[float]:
        target = ctx.request.session_endpoint
        return [1.0 if target is not None and e.name == target else 0.0 for e in endpoints]


def _build(name: str, params: NoParams, deps: BuildContext) -> SessionAffinityScorer:
    return SessionAffinityScorer(name)


FACTORY = PluginFactory("session-affinity-scorer", "scorer", NoParams, _build, "the session's last endpoint")
