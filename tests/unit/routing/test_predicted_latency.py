"""predicted-latency-scorer, the imbalance-guard picker and the prefix scorer's traffic share."""
from __future__ import annotations

import pytest

from routing.latency import TTFTCoefficients
from routing.plugins.imbalance_guard import ImbalanceGuardParams, ImbalanceGuardPicker
from routing.plugins.predicted_latency import PredictedLatencyParams, PredictedLatencyScorer
from routing.plugins.prefix_scorer import PrefixCacheScorer
from routing.prefix import ApproxPrefixIndex
from routing.types import Candidate, EndpointView, LatencyPrediction, PrefixMatch
from tests.unit.routing.helpers import FakeClock, context, view

H100 = TTFTCoefficients(0.03, 1 / 5500, 0.0)
A100 = TTFTCoefficients(0.04, 1 / 2800, 0.0)


def _costs(params: dict[str, object], views: list[EndpointView], match: PrefixMatch | None,
           prompt: int = 1000) -> tuple[list[float], dict[str, float]]:
    base: dict[str, object] = {"miss_weight": 1.0, "home_fraction": 0.0}
    scorer = PredictedLatencyScorer("pl", PredictedLatencyParams(**{**base, **params}), clock=lambda: 0.0)  # type: ignore[arg-type]
    ctx = context(*views, prompt_tokens=prompt)
    ctx.prefix = match
    costs = scorer.costs(ctx, views)
    assert ctx.latency is not None
    return costs, dict(ctx.latency.ttft_s)


def test_a_faster_replica_counts_its_queue_as_shorter() -> None:
    # Same 4,000 queued tokens: in tokens the two tie; in seconds the h100 is about twice as fast.
    views = [view("h", ttft=H100, inflight_prompt_tokens=4000), view("a", ttft=A100, inflight_prompt_tokens=4000)]
    costs, predicted = _costs({}, views, None)
    assert predicted["h"] == pytest.approx(0.03 + 5000 / 5500)
    assert predicted["a"] == pytest.approx(0.04 + 5000 / 2800)
    assert costs == pytest.approx([predicted["h"], predicted["a"]])


def test_cache_hits_and_the_miss_weight_in_seconds() -> None:
    views = [view("a", ttft=H100), view("b", ttft=H100)]
    costs, predicted = _costs({"miss_weight": 5.0}, views, PrefixMatch({"a": 0.8}))
    assert predicted["a"] == pytest.approx(0.03 + 200 / 5500)
    assert costs[1] == pytest.approx(0.03 + 1000 / 5500 + 4 * 0.8 * 1000 / 5500)


def test_hot_replication_divides_the_extra_miss_by_the_prefixs_replicas_worth() -> None:
    views = [view(n, ttft=H100) for n in "abcd"]
    cold, _ = _costs({"miss_weight": 5.0, "hot_replication": True}, views, PrefixMatch({"a": 1.0}, share=0.1))
    hot, _ = _costs({"miss_weight": 5.0, "hot_replication": True}, views, PrefixMatch({"a": 1.0}, share=1.0))
    assert cold[1] == pytest.approx(0.03 + 1000 / 5500 * 5)  # 0.1 x 4 < 1 replica: the full weight
    assert hot[1] == pytest.approx(0.03 + 1000 / 5500 * 2)  # all the traffic, 4 replicas: 4 / 4 extra


def test_home_discount_in_the_homes_seconds() -> None:
    views = [view("a", ttft=A100), view("b", ttft=A100)]
    costs, _ = _costs({"home_fraction": 0.5}, views, PrefixMatch({}, home="a"))
    assert costs[0] == pytest.approx(costs[1] - 500 / 2800)


def _cands(*names: str) -> list[Candidate]:
    return [Candidate(n, "", 1.0 - i * 0.1) for i, n in enumerate(names)]


@pytest.mark.parametrize(("params", "inflight", "first"), [
    ({"abs_threshold": 8, "rel_threshold": 1.5}, (12, 2, 5), "b"),  # imbalanced: least loaded first
    ({"abs_threshold": 8, "rel_threshold": 1.5}, (9, 2, 5), "a"),  # within the absolute threshold
    ({"abs_threshold": 2, "rel_threshold": 3.0}, (9, 4, 5), "a"),  # within the relative threshold
])
def test_imbalance_guard_on_requests(params: dict[str, float], inflight: tuple[int, ...], first: str) -> None:
    picker = ImbalanceGuardPicker("g", ImbalanceGuardParams(**params))  # type: ignore[arg-type]
    ctx = context(*(view(n, inflight_requests=k) for n, k in zip("abc", inflight, strict=True)))
    ranked = picker.pick(ctx, _cands("a", "b", "c"))
    assert ranked[0].endpoint == first and sorted(c.endpoint for c in ranked) == ["a", "b", "c"]


def test_imbalance_guard_on_predicted_latency_and_without_a_predictor() -> None:
    picker = ImbalanceGuardPicker("g", ImbalanceGuardParams(load="predicted", abs_threshold=1.0))
    ctx = context(view("a"), view("b"))
    assert picker.pick(ctx, _cands("a", "b"))[0].endpoint == "a"  # no predictions: scores decide
    ctx.latency = LatencyPrediction({"a": 3.0, "b": 0.5})
    assert picker.pick(ctx, _cands("a", "b"))[0].endpoint == "b"


def test_the_prefix_share_is_the_recent_fraction_of_traffic_with_that_first_block() -> None:
    clock = FakeClock(0.0)
    scorer = PrefixCacheScorer("p", ApproxPrefixIndex(16, 64, lambda _e: 1000), 16, seen_capacity=64,
                               clock=clock, share_window_s=10.0)
    views = [view("a"), view("b")]
    hot, other = b"the hot system prompt" * 4, b"some other prompt...." * 4
    for i in range(40):
        clock.now += 0.1
        prompt = hot if i % 4 else other + bytes([i])  # 3/4 of the traffic shares the hot prefix
        ctx = context(*views, prompt=prompt)
        scorer.score(ctx, views)
        scorer.observe(ctx.request, "a")
    ctx = context(*views, prompt=hot)
    scorer.score(ctx, views)
    assert ctx.prefix is not None and ctx.prefix.share == pytest.approx(0.75, abs=0.05)
    clock.now += 100.0  # long quiet: shares decay together, so the ratio holds
    ctx = context(*views, prompt=hot)
    scorer.score(ctx, views)
    assert ctx.prefix is not None and ctx.prefix.share == pytest.approx(0.75, abs=0.05)
