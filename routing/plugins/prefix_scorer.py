"""Scorer ``prefix-cache-scorer``: the fraction of the prompt's leading blocks believed cached on each endpoint.

A thin scorer over a :class:`~routing.prefix.PrefixIndex`; the approximate index is updated after the pick.
"""
from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from routing.plugins.base import BuildContext, CycleContext, Params, PluginFactory
from routing.plugins.prefill_cost import PREFIX_MATCH_KEY
from routing.prefix import ApproxPrefixIndex, PrefixIndex
from routing.types import EndpointView, RoutingRequest

__all__ = ["FACTORY", "PrefixCacheScorer", "PrefixParams"]


class PrefixParams(Params):
    block_size: int = Field(default=256, ge=8, description="bytes per hashed block (~64 tokens of English)")
    max_blocks: int = Field(default=512, ge=1, description="longest prompt prefix considered, in blocks")
    lru_capacity_per_endpoint: int | None = Field(
        default=None, ge=1, description="blocks remembered per endpoint; None derives it from the KV capacity"
    )
    bytes_per_token: float = Field(default=4.0, gt=0, description="to turn KV tokens into prompt bytes")
    fallback_capacity: int = Field(default=31_250, ge=1, description="blocks when the KV capacity is unknown")


class PrefixCacheScorer:
    def __init__(self, name: str, index: PrefixIndex) -> None:
        self.name = name
        self.index = index

    def score(self, ctx: CycleContext, endpoints: Sequence[EndpointView]) -> list[float]:
        names = [e.name for e in endpoints]
        scores = self.index.match(ctx.request, names)
        # Producer role: cost-based scorers later in the profile read the match from the scratch pad.
        ctx.scratch[PREFIX_MATCH_KEY] = dict(zip(names, scores, strict=True))
        return scores

    def observe(self, request: RoutingRequest, endpoint: str) -> None:
        self.index.observe(request, endpoint)


def _build(name: str, params: PrefixParams, deps: BuildContext) -> PrefixCacheScorer:
    fixed = params.lru_capacity_per_endpoint

    def capacity_of(endpoint: str) -> int:
        if fixed is not None:
            return fixed
        m = deps.datastore.metrics_of(endpoint)
        if m is None or m.kv_capacity_tokens is None:
            return params.fallback_capacity
        return int(m.kv_capacity_tokens * params.bytes_per_token / params.block_size)

    index = ApproxPrefixIndex(params.block_size, params.max_blocks, capacity_of)
    deps.datastore.add_restart_listener(index.drop)
    return PrefixCacheScorer(name, index)


FACTORY = PluginFactory(
    "prefix-cache-scorer", "scorer", PrefixParams, _build, "fraction of the prompt cached (approximate)"
)
