"""Scorer ``prefill-cost-scorer``: estimated prefill work ahead of this request's first token on each endpoint.

cost = prompt tokens still awaiting prefill there (at least ``waiting_floor_tokens`` per request the engine
reports waiting) + this prompt's uncached part (from the prefix scorer's match, ``CycleContext.prefix``),
the part beyond the best-cached endpoint's weighted by ``miss_weight`` (less for a hot prefix) + a
per-request charge for decode batch load. Tokens are one unit for queueing and cache misses, so no
weight has to trade them off.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from pydantic import Field

from routing.plugins.base import BuildContext, CycleContext, Params, PluginFactory
from routing.types import EndpointView

__all__ = ["FACTORY", "PrefillCostParams", "PrefillCostScorer"]


class PrefillCostParams(Params):
    per_request_tokens: float = Field(default=64.0, ge=0, description="token-equivalent cost of one in-flight request")
    waiting_tokens: float = Field(default=512.0, ge=0, description="token-equivalent of one scraped waiting request")
    smoothing_tokens: float = Field(default=256.0, gt=0, description="keeps near-idle endpoints from looking far apart")
    miss_weight: float = Field(
        default=5.0, ge=1.0,
        description="weight of the prompt tokens an endpoint would recompute beyond the best-cached one's: "
        "a miss also delays every later request queued there and spends KV on a second copy",
    )
    drain_rate_fraction: float = Field(
        default=0.7, ge=0, le=2,
        description="count prompt tokens awaiting prefill net of the progress the endpoint's measured prefill "
        "rate (times this) implies since its backlog began; 0 counts them all until the first token",
    )
    waiting_floor_tokens: float = Field(
        default=1024.0, ge=0,
        description="each request an endpoint reports waiting, ours included, counts as at least this many "
        "tokens of queued work: a request queued for KV space waits for running ones to finish decoding, "
        "which the prefill estimate (its few uncached tokens) does not show; 0: off",
    )
    hot_replication: bool = Field(
        default=True,
        description="divide the extra miss weight by how many replicas' worth of traffic the prefix carries "
        "(PrefixMatch.share x candidates), so a hot prefix is copied to a less-loaded replica sooner",
    )
    home_fraction: float = Field(
        default=0.5, ge=0,
        description="discount on the prefix's home endpoint, as a fraction of the prompt, when it is cached "
        "nowhere: a new or evicted prefix group goes back to the same replica unless that one is this much busier",
    )
    free_needs_pressure: bool = Field(
        default=False,
        description="with PrefixMatch.free, a copy into free cache is spared the extra miss weight only as far "
        "as the best-cached endpoint's own cache is full (1 - its free share)",
    )
    home_miss_exempt: bool = Field(
        default=False,
        description="the home pays no extra miss weight for a shallower shared prefix it lacks (a system prompt "
        "cached elsewhere): a document under it then starts on its own home, not where the system prompt is",
    )


class PrefillCostScorer:
    def __init__(self, name: str, params: PrefillCostParams, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._p = params
        self._clock = clock

    def costs(self, ctx: CycleContext, endpoints: Sequence[EndpointView]) -> list[float]:
        p = self._p
        prefix = ctx.prefix
        matched = prefix.cached if prefix is not None else {}
        home = prefix.home if prefix is not None else None
        prompt = ctx.request.prompt_tokens or max(1, len(ctx.request.prompt) // 4)
        best_match = prefix.best if prefix is not None else 0.0
        extra_miss = p.miss_weight - 1.0
        if p.hot_replication and prefix is not None and prefix.share > 0:
            extra_miss /= max(1.0, prefix.share * len(endpoints))
        drain, per_request, per_waiting = p.drain_rate_fraction, p.per_request_tokens, p.waiting_tokens
        floor = p.waiting_floor_tokens
        exempt = home if p.home_miss_exempt else None
        free = prefix.free if prefix is not None else {}
        if free and p.free_needs_pressure:
            # A copy into free cache evicts nothing, but it only relieves anything when the prefix's holder
            # is full (its content being evicted); where everything fits a copy is just recomputation.
            holder = max(matched, key=lambda n: matched[n], default=None) if best_match > 0 else None
            pressure = 1.0 - free.get(holder, 1.0) if holder is not None else 1.0
            free = {n: f * pressure for n, f in free.items()}
        now = self._clock()
        out = []
        for e in endpoints:
            # Scraped waiting overlaps the gateways' in-flight requests; only the excess is someone else's.
            foreign = e.unaccounted_waiting()
            queued = e.pending_prefill_tokens(now, drain)
            if floor:
                m = e.trusted_metrics()
                if m is not None and m.waiting * floor > queued:
                    queued = m.waiting * floor
            hit = matched.get(e.name, 0.0)
            cost = (
                queued
                + (1.0 - hit) * prompt
                + (0.0 if e.name == exempt else
                   extra_miss * (best_match - hit) * prompt * (1.0 - free.get(e.name, 0.0)))
                + per_request * e.inflight_requests
                + per_waiting * foreign
            )
            if e.name == home:
                cost = max(0.0, cost - p.home_fraction * prompt)
            out.append(cost)
        return out

    def score(self, ctx: CycleContext, endpoints: Sequence[EndpointView]) -> list[float]:
        costs = self.costs(ctx, endpoints)
        floor = min(costs) + self._p.smoothing_tokens
        return [floor / (c + self._p.smoothing_tokens) for c in costs]


def _build(name: str, params: PrefillCostParams, deps: BuildContext) -> PrefillCostScorer:
    return PrefillCostScorer(name, params, deps.clock)


FACTORY = PluginFactory("prefill-cost-scorer", "scorer", PrefillCostParams, _build, "estimated prefill work ahead",
                        version=2)  # 2: hot_replication and waiting_floor_tokens 1024 on by default
