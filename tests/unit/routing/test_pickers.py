"""Table-driven and statistical tests for pickers and the SGLang cache_aware baseline."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from routing.config import RoutingConfig
from routing.plugins.cache_aware import CacheAwareParams, CacheAwarePicker
from routing.plugins.max_score import MaxScorePicker
from routing.plugins.power_of_two import PowerOfTwoPicker
from routing.plugins.random_picker import RandomPicker
from routing.plugins.round_robin import RoundRobinPicker
from routing.plugins.weighted_random import WeightedRandomParams, WeightedRandomPicker
from routing.scheduler import build_scheduler
from routing.types import Candidate, RoutingRequest
from tests.unit.routing.helpers import context, make_datastore, view


def _cands(*scores: float) -> list[Candidate]:
    return [Candidate(endpoint=chr(ord("a") + i), url="", score=s) for i, s in enumerate(scores)]


def _firsts(picker: object, scores: tuple[float, ...], n: int = 400) -> Counter[str]:
    ctx = context(*(view(chr(ord("a") + i)) for i in range(len(scores))), rng_seed=7)
    return Counter(picker.pick(ctx, _cands(*scores))[0].endpoint for _ in range(n))  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("picker", "scores", "allowed"),
    [
        (MaxScorePicker("p"), (0.1, 0.9, 0.5), {"b"}),
        (MaxScorePicker("p"), (0.9, 0.9, 0.1), {"a", "b"}),
        (WeightedRandomPicker("p", WeightedRandomParams(k=2)), (0.1, 0.9, 0.5), {"b", "c"}),
        (PowerOfTwoPicker("p"), (0.1, 0.9, 0.5), {"b", "c"}),
        (RandomPicker("p"), (0.1, 0.9, 0.5), {"a", "b", "c"}),
    ],
)
def test_picker_first_choices(picker: object, scores: tuple[float, ...], allowed: set[str]) -> None:
    firsts = _firsts(picker, scores)
    assert set(firsts) == allowed


@pytest.mark.parametrize(
    "picker",
    [MaxScorePicker("p"), WeightedRandomPicker("p", WeightedRandomParams()), PowerOfTwoPicker("p"),
     RandomPicker("p"), RoundRobinPicker("p")],
)
def test_pickers_rank_every_candidate_once(picker: object) -> None:
    ctx = context(view("a"), view("b"), view("c"), view("d"))
    ranked = picker.pick(ctx, _cands(0.3, 0.2, 0.9, 0.1))  # type: ignore[attr-defined]
    assert sorted(c.endpoint for c in ranked) == ["a", "b", "c", "d"]


def test_round_robin_rotates() -> None:
    picker = RoundRobinPicker("rr")
    ctx = context(view("a"), view("b"), view("c"))
    assert [picker.pick(ctx, _cands(0, 0, 0))[0].endpoint for _ in range(4)] == ["a", "b", "c", "a"]


def _cache_aware(ctx_views: list, prompt: bytes, picker: CacheAwarePicker) -> str:  # type: ignore[type-arg]
    ctx = context(*ctx_views, prompt=prompt)
    chosen = picker.pick(ctx, [Candidate(v.name, v.url, 0.0) for v in ctx_views])[0].endpoint
    picker.observe(ctx.request, chosen)
    return chosen


def test_cache_aware_follows_cache_until_imbalanced() -> None:
    picker = CacheAwarePicker("ca", CacheAwareParams(balance_abs_threshold=4, balance_rel_threshold=1.5))
    idle = [view("a"), view("b")]
    system = b"S" * 400
    first = _cache_aware(idle, system + b"q1", picker)
    assert _cache_aware(idle, system + b"q2", picker) == first
    # Below the cache threshold: the worker with the smaller tree gets it.
    other = "b" if first == "a" else "a"
    assert _cache_aware(idle, b"Z" * 400, picker) == other
    mild = [view(first, inflight_requests=4), view(other, inflight_requests=1)]
    assert _cache_aware(mild, system + b"q3", picker) == first
    busy = [view(first, inflight_requests=10), view(other, inflight_requests=1)]
    assert _cache_aware(busy, system + b"q4", picker) == other


def test_baseline_profiles_build_from_config() -> None:
    cfg = RoutingConfig.model_validate(
        {
            "profiles": [
                {"name": "rr", "picker": "round-robin"},
                {"name": "random", "picker": "random"},
                {"name": "lr", "plugins": [{"ref": "least-request-scorer"}]},
                {"name": "ca", "picker": "cache-aware"},
            ]
        }
    )
    sched = build_scheduler(cfg, make_datastore(), rng=random.Random(0))
    for profile in ("rr", "random", "lr", "ca"):
        req = RoutingRequest("m", b"x" * 100, profile=profile)
        decision = sched.schedule(req)
        sched.observe(req, decision.best.endpoint)
        assert len(decision.ranked) == 3


def test_max_score_draws_one_tie_break_per_candidate_in_order() -> None:
    ctx = context(view("a"), view("b"), view("c"), view("d"), rng_seed=3)
    ranked = MaxScorePicker("p").pick(ctx, _cands(0.5, 0.9, 0.5, 0.5))
    twin = random.Random(3)
    draws = [twin.random() for _ in range(4)]
    expected = sorted(zip(_cands(0.5, 0.9, 0.5, 0.5), draws, strict=True), key=lambda cd: (-cd[0].score, cd[1]))
    assert [c.endpoint for c in ranked] == [c.endpoint for c, _ in expected]
    assert ctx.rng.random() == twin.random()  # exactly one draw per candidate


def test_content_tie_break_is_the_same_on_every_replica_and_spreads_requests() -> None:
    import random as _random
    from collections import Counter

    from routing.plugins.base import CycleContext
    from routing.types import Snapshot

    def ranked(prompt: bytes, seed: int) -> list[str]:
        ctx = CycleContext(request=RoutingRequest(model="m", prompt=prompt), snapshot=Snapshot({}, 0.0),
                           rng=_random.Random(seed))
        return [c.endpoint for c in MaxScorePicker("p", "content").pick(ctx, _cands(0.5, 0.5, 0.5, 0.2))]

    # Different rngs (replicas), same content: the same order; the lower score stays last.
    for i in range(20):
        p = f"prompt {i}".encode()
        assert ranked(p, 1) == ranked(p, 2) and ranked(p, 1)[-1] == "d"
    firsts = Counter(ranked(f"p{i}".encode(), 0)[0] for i in range(300))
    assert set(firsts) == {"a", "b", "c"} and min(firsts.values()) > 60
