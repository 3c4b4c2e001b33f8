"""The oracle: a :class:`~routing.prefix.PrefixIndex` that reads the simulated engines' true cache state.

It is the upper bound that precise, KV-event-driven routing approaches; only the evaluator can build it.
A prefix counts as cached on an engine once it is in its KV cache *or* queued there for prefill (a
request that will have computed it before ours is admitted), so the oracle does not copy a prefix
that is merely still in flight, as a KV-event-fed index would also know.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from routing.plugins.base import BuildContext, NoParams, PluginFactory
from routing.plugins.prefix_scorer import PrefixCacheScorer, PrefixParams
from routing.plugins.registry import Registry, default_registry
from routing.types import RoutingRequest
from simulator.engine import Engine
from simulator.kvcache import block_hashes

__all__ = ["OracleIndex", "OracleParams", "oracle_registry"]


class OracleParams(NoParams):
    pass


class OracleIndex:
    def __init__(self, engines: Mapping[str, Engine], tokens_of: Callable[[RoutingRequest], list[int]]) -> None:
        self._engines = engines
        self._tokens_of = tokens_of
        # endpoint -> block hash -> requests routed there whose prefill has not finished yet
        self._pending: dict[str, dict[int, int]] = {e: {} for e in engines}
        self._routed: dict[str, tuple[str, list[int]]] = {}  # request id -> (endpoint, its block hashes)

    def _hashes(self, req: RoutingRequest, tokens: list[int], endpoint: str) -> list[int]:
        return block_hashes(tokens, self._engines[endpoint].config.block_size, req.cache_salt, req.lora)

    def match(self, req: RoutingRequest, endpoints: Sequence[str]) -> list[float]:
        tokens = self._tokens_of(req)
        if not tokens:
            return [0.0] * len(endpoints)
        out = []
        hashes: list[int] | None = None
        for e in endpoints:
            engine = self._engines[e]
            cached = engine.cached_prefix_tokens(tokens, req.cache_salt, req.lora)
            pending = self._pending[e]
            if pending:
                hashes = hashes if hashes is not None else self._hashes(req, tokens, e)
                n = 0
                for h in hashes:
                    if h not in pending:
                        break
                    n += 1
                cached = max(cached, n * engine.config.block_size)
            out.append(cached / len(tokens))
        return out

    def observe(self, req: RoutingRequest, endpoint: str) -> None:
        tokens = self._tokens_of(req)
        if not tokens or not req.request_id:
            return
        hashes = self._hashes(req, tokens, endpoint)
        pending = self._pending[endpoint]
        for h in hashes:
            pending[h] = pending.get(h, 0) + 1
        self._routed[req.request_id] = (endpoint, hashes)

    def prefilled(self, request_id: str) -> None:
        """The request's first token arrived (or it was dropped): its blocks are the engine's to report now."""
        routed = self._routed.pop(request_id, None)
        if routed is None:
            return
        endpoint, hashes = routed
        pending = self._pending[endpoint]
        for h in hashes:
            left = pending.get(h, 0) - 1
            if left > 0:
                pending[h] = left
            else:
                pending.pop(h, None)

    def drop(self, endpoint: str) -> None:
        """Nothing to forget: the engines are the truth."""


def oracle_registry(index: OracleIndex) -> Registry:
    """The default registry plus ``oracle-prefix-scorer`` wired to ``index``."""
    registry = default_registry()

    def build(name: str, params: OracleParams, deps: BuildContext) -> PrefixCacheScorer:
        # Same home rule as the default profile, so the two differ only in what they know is cached.
        defaults = PrefixParams()
        return PrefixCacheScorer(name, index, seen_capacity=defaults.home_seen_capacity, clock=deps.clock,
                                 share_window_s=defaults.share_window_s)

    registry.add(PluginFactory("oracle-prefix-scorer", "scorer", OracleParams, build, "true engine cache state"))
    return registry
