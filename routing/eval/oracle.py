"""The oracle: a :class:`~routing.prefix.PrefixIndex` that reads the simulated engines' true cache state.

It is the upper bound that precise, KV-event-driven routing approaches; only the evaluator can build it.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from routing.plugins.base import BuildContext, NoParams, PluginFactory
from routing.plugins.prefix_scorer import PrefixCacheScorer
from routing.plugins.registry import Registry, default_registry
from routing.types import RoutingRequest
from simulator.engine import Engine

__all__ = ["OracleIndex", "OracleParams", "oracle_registry"]


class OracleParams(NoParams):
    pass


class OracleIndex:
    def __init__(self, engines: Mapping[str, Engine], tokens_of: Callable[[RoutingRequest], list[int]]) -> None:
        self._engines = engines
        self._tokens_of = tokens_of

    def match(self, req: RoutingRequest, endpoints: Sequence[str]) -> list[float]:
        tokens = self._tokens_of(req)
        if not tokens:
            return [0.0] * len(endpoints)
        return [
            self._engines[e].cached_prefix_tokens(tokens, req.cache_salt, req.lora) / len(tokens) for e in endpoints
        ]

    def observe(self, req: RoutingRequest, endpoint: str) -> None:
        """Nothing to learn: the engines are the truth."""

    def drop(self, endpoint: str) -> None:
        """Nothing to forget."""


def oracle_registry(engines: Mapping[str, Engine], tokens_of: Callable[[RoutingRequest], list[int]]) -> Registry:
    """The default registry plus ``oracle-prefix-scorer`` wired to these engines."""
    registry = default_registry()

    def build(name: str, params: OracleParams, deps: BuildContext) -> PrefixCacheScorer:
        return PrefixCacheScorer(name, OracleIndex(engines, tokens_of))

    registry.add(PluginFactory("oracle-prefix-scorer", "scorer", OracleParams, build, "true engine cache state"))
    return registry
