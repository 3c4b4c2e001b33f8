"""Scorer ``predicted-latency-scorer``: each endpoint's predicted time to first token, from a TTFT model
the datastore fits online per endpoint (``EndpointView.ttft``, routing/latency.py), plus the cost a
cache miss imposes on later requests.

Seconds instead of tokens, so a replica that prefills twice as fast (an h100 beside an a100) counts
its queue as half as long. Publishes the predictions (``CycleContext.latency``) for the SLO rule.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from pydantic import Field

from routing.latency import DRAIN_RATE_FRACTION
from routing.plugins.base import BuildContext, CycleContext, Params, PluginFactory
from routing.types import EndpointView, LatencyPrediction

__all__ = ["FACTORY", "PredictedLatencyParams", "PredictedLatencyScorer"]


class PredictedLatencyParams(Params):
    miss_weight: float = Field(
        default=5.0, ge=1.0,
        description="weight of the prefill an endpoint would repeat beyond the best-cached one's (as in "
        "prefill-cost-scorer): a copy also delays later requests there and spends KV on a duplicate",
    )
    hot_replication: bool = Field(
        default=False,
        description="divide the extra miss weight by how many replicas' worth of traffic the prefix "
        "carries (PrefixMatch.share x candidates), so a hot prefix is copied once its holders are busier "
        "than the copy costs, and a cold one is not",
    )
    home_fraction: float = Field(default=0.5, ge=0, description="as in prefill-cost-scorer, in the home's seconds")
    waiting_tokens: float = Field(default=512.0, ge=0, description="prompt tokens assumed per scraped waiting "
                                  "request that is not ours (another gateway's)")
    smoothing_s: float = Field(default=0.05, gt=0, description="keeps near-idle endpoints from looking far apart")


class PredictedLatencyScorer:
    def __init__(self, name: str, params: PredictedLatencyParams, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._p = params
        self._clock = clock

    def costs(self, ctx: CycleContext, endpoints: Sequence[EndpointView]) -> list[float]:
        """Per endpoint: predicted TTFT there plus the weighted extra miss, in seconds."""
        p = self._p
        prefix = ctx.prefix
        matched = prefix.cached if prefix is not None else {}
        home = prefix.home if prefix is not None else None
        best = prefix.best if prefix is not None else 0.0
        prompt = ctx.request.prompt_tokens or max(1, len(ctx.request.prompt) // 4)
        extra = p.miss_weight - 1.0
        if p.hot_replication and prefix is not None and prefix.share > 0:
            extra /= max(1.0, prefix.share * len(endpoints))
        now = self._clock()
        predicted: dict[str, float] = {}
        out = []
        for e in endpoints:
            hit = matched.get(e.name, 0.0)
            foreign = e.unaccounted_waiting()
            ahead = e.pending_prefill_tokens(now, DRAIN_RATE_FRACTION) + (1.0 - hit) * prompt
            if foreign > 0:
                ahead += p.waiting_tokens * foreign
            model = e.ttft
            ttft = model.predict(ahead, e.inflight_requests)
            predicted[e.name] = ttft
            cost = ttft + extra * (best - hit) * prompt * model.per_token_s
            if e.name == home:
                cost = max(0.0, cost - p.home_fraction * prompt * model.per_token_s)
            out.append(cost)
        ctx.latency = LatencyPrediction(predicted)
        return out

    def score(self, ctx: CycleContext, endpoints: Sequence[EndpointView]) -> list[float]:
        costs = self.costs(ctx, endpoints)
        floor = min(costs) + self._p.smoothing_s
        return [floor / (c + self._p.smoothing_s) for c in costs]


def _build(name: str, params: PredictedLatencyParams, deps: BuildContext) -> PredictedLatencyScorer:
    return PredictedLatencyScorer(name, params, deps.clock)


FACTORY = PluginFactory("predicted-latency-scorer", "scorer", PredictedLatencyParams, _build,
                        "predicted TTFT from a per-endpoint model fitted online")
