"""Scorer ``prefill-cost-scorer``: estimated prefill work ahead of this request's first token on each endpoint.

cost = prompt tokens still awaiting prefill there + this prompt's uncached part (from the prefix
scorer's match, shared through the cycle scratch pad) + a per-request charge for decode batch load.
Tokens are one unit for queueing and cache misses, so no weight has to trade them off.
"""
from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from routing.plugins.base import BuildContext, CycleContext, Params, PluginFactory
from routing.types import EndpointView

__all__ = ["FACTORY", "PREFIX_MATCH_KEY", "PrefillCostParams", "PrefillCostScorer"]

PREFIX_MATCH_KEY = "prefix_match"  # scratch-pad key: dict endpoint -> fraction of the prompt cached


class PrefillCostParams(Params):
    per_request_tokens: float = Field(default=64.0, ge=0, description="token-equivalent cost of one in-flight request")
    waiting_tokens: float = Field(default=512.0, ge=0, description="token-equivalent of one scraped waiting request")
    smoothing_tokens: float = Field(default=256.0, gt=0, description="keeps near-idle endpoints from looking far apart")


class PrefillCostScorer:
    def __init__(self, name: str, params: PrefillCostParams) -> None:
        self.name = name
        self._p = params

    def costs(self, ctx: CycleContext, endpoints: Sequence[EndpointView]) -> list[float]:
        p = self._p
        matched: dict[str, float] = ctx.scratch.get(PREFIX_MATCH_KEY, {})
        prompt = ctx.request.prompt_tokens or max(1, len(ctx.request.prompt) // 4)
        out = []
        for e in endpoints:
            m = e.trusted_metrics()
            # Scraped waiting overlaps our own in-flight requests; only the excess is someone else's.
            foreign_waiting = max(0, (m.waiting if m is not None else 0) - e.inflight_requests)
            out.append(
                e.inflight_prompt_tokens
                + (1.0 - matched.get(e.name, 0.0)) * prompt
                + p.per_request_tokens * e.inflight_requests
                + p.waiting_tokens * foreign_waiting
            )
        return out

    def score(self, ctx: CycleContext, endpoints: Sequence[EndpointView]) -> list[float]:
        costs = self.costs(ctx, endpoints)
        floor = min(costs) + self._p.smoothing_tokens
        return [floor / (c + self._p.smoothing_tokens) for c in costs]


def _build(name: str, params: PrefillCostParams, deps: BuildContext) -> PrefillCostScorer:
    return PrefillCostScorer(name, params)


FACTORY = PluginFactory("prefill-cost-scorer", "scorer", PrefillCostParams, _build, "estimated prefill work ahead")
