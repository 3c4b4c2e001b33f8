from __future__ import annotations

import random
from collections import Counter

import pytest

from routing.config import RoutingConfig
from routing.errors import ModelNotServed, NoHealthyEndpoint, UnknownProfile
from routing.scheduler import build_scheduler
from routing.types import EndpointSpec, RoutingRequest
from tests.unit.routing.helpers import FakeClock, make_datastore, metrics


def _req(**kw: object) -> RoutingRequest:
    return RoutingRequest(model=str(kw.pop("model", "m")), prompt=b"hello", **kw)  # type: ignore[arg-type]


def test_default_profile_prefers_the_shorter_queue() -> None:
    ds = make_datastore()
    ds.begin("a", 1, 1)
    ds.update_metrics("b", metrics(waiting=4))
    decision = build_scheduler(RoutingConfig(), ds, rng=random.Random(0)).schedule(_req())
    assert [c.endpoint for c in decision.ranked] == ["c", "a", "b"]
    assert decision.ranked[0].scores["prefill-cost"] == 1.0
    assert decision.profile == "default" and decision.latency_s >= 0
    assert {"model-served", "healthy", "prefill-cost", "max-score"} <= decision.timings.keys()


def test_ties_are_broken_at_random() -> None:
    ds = make_datastore()
    sched = build_scheduler(RoutingConfig(), ds, rng=random.Random(1))
    firsts = Counter(sched.schedule(_req()).best.endpoint for _ in range(300))
    assert set(firsts) == {"a", "b", "c"} and min(firsts.values()) > 60


def test_inflight_spreads_a_burst() -> None:
    ds = make_datastore()
    sched = build_scheduler(RoutingConfig(), ds, rng=random.Random(2))
    picks = []
    for _ in range(6):
        best = sched.schedule(_req()).best.endpoint
        ds.begin(best, 10, 10)
        picks.append(best)
    assert Counter(picks) == {"a": 2, "b": 2, "c": 2}


def test_unknown_model_and_no_healthy_endpoint() -> None:
    clock = FakeClock()
    ds = make_datastore(clock=clock)
    sched = build_scheduler(RoutingConfig(), ds, rng=random.Random(0))
    with pytest.raises(ModelNotServed) as missing:
        sched.schedule(_req(model="other"))
    assert missing.value.code == "model_not_found"
    ds.set_healthy("a", False, "down")
    ds.set_circuit_open("b", True)
    ds.update_metrics("c", metrics())
    clock.now += 10  # c's metrics go stale: load unknown, not dead (docs/resilience.md)
    assert sched.schedule(_req()).best.endpoint == "c"
    ds.set_healthy("c", False, "probe failed")
    with pytest.raises(NoHealthyEndpoint) as none:
        sched.schedule(_req())
    assert none.value.code == "no_healthy_endpoint" and "healthy" in str(none.value)


def test_unknown_profile_is_an_error() -> None:
    sched = build_scheduler(RoutingConfig(), make_datastore(), rng=random.Random(0))
    with pytest.raises(UnknownProfile):
        sched.schedule(_req(profile="nope"))


def test_framework_clamps_and_weights() -> None:
    class Wild:
        name = "wild"

        def score(self, ctx: object, endpoints: list[object]) -> list[float]:
            return [5.0, float("nan"), -3.0][: len(endpoints)]

    from routing.plugins.base import Params, PluginFactory
    from routing.plugins.registry import default_registry

    registry = default_registry()
    registry.add(PluginFactory("wild-scorer", "scorer", Params, lambda name, p, d: Wild()))
    cfg = RoutingConfig.model_validate(
        {"profiles": [{"name": "w", "plugins": [{"ref": "wild-scorer", "weight": 2}]}]},
        context={"registry": registry},
    )
    decision = build_scheduler(cfg, make_datastore(), rng=random.Random(0), registry=registry).schedule(_req())
    by_name = {c.endpoint: c for c in decision.ranked}
    assert by_name["a"].score == 2.0 and by_name["a"].scores["wild"] == 1.0
    assert by_name["b"].score == 0.0 and by_name["c"].score == 0.0
    assert decision.best.endpoint == "a"


def test_single_candidate_skips_scorers_but_observers_still_learn() -> None:
    ds = make_datastore(names=("a",))
    scheduler = build_scheduler(RoutingConfig(), ds, rng=random.Random(0))
    req = RoutingRequest(model="m", prompt=b"q" * 1024, prompt_tokens=256)
    decision = scheduler.schedule(req)
    assert [c.endpoint for c in decision.ranked] == ["a"]
    assert decision.best.uncached_tokens == 256 and "prefix" not in decision.timings
    scheduler.observe(req, "a")
    ds.upsert(EndpointSpec("b", "http://b", frozenset({"m"})))
    again = scheduler.schedule(req)
    assert again.best.endpoint == "a" and again.best.scores["prefix"] == 1.0


def test_candidate_scores_are_read_lazily_from_the_score_table() -> None:
    ds = make_datastore()
    ds.update_metrics("b", metrics(waiting=4))
    decision = build_scheduler(RoutingConfig(), ds, rng=random.Random(0)).schedule(_req())
    names = ["prefix", "prefill-cost", "load-guard", "session", "lora"]
    for cand in decision.ranked:
        assert list(cand.scores) == names and all(0.0 <= v <= 1.0 for v in cand.scores.values())
        assert cand.scores is cand.scores  # built once
    by_name = {c.endpoint: c for c in decision.ranked}
    assert by_name["b"].scores["prefill-cost"] < by_name["a"].scores["prefill-cost"] == 1.0
    assert "prefill-cost=" in decision.header()


def test_candidate_keeps_its_value_semantics() -> None:
    from routing.types import Candidate

    plain = Candidate("a", "http://a", 1.5)
    assert plain.scores == {} and plain.uncached_tokens == 0
    plain.scores = {"x": 0.5}
    assert plain == Candidate("a", "http://a", 1.5, {"x": 0.5}) != Candidate("a", "http://a", 1.5)
    assert repr(plain) == "Candidate(endpoint='a', url='http://a', score=1.5, scores={'x': 0.5}, uncached_tokens=0)"


def _custom_scheduler(*scorers: tuple[str, list[float], float]) -> object:
    from routing.plugins.base import Params, PluginFactory
    from routing.plugins.registry import default_registry

    class Fixed:
        def __init__(self, name: str, values: list[float]) -> None:
            self.name, self.values = name, values

        def score(self, ctx: object, endpoints: list[object]) -> list[float]:
            return self.values

    registry = default_registry()
    for name, values, _ in scorers:
        registry.add(PluginFactory(f"{name}-scorer", "scorer", Params,
                                   lambda key, p, d, name=name, values=values: Fixed(name, values)))
    cfg = RoutingConfig.model_validate(
        {"profiles": [{"name": "t", "plugins": [{"ref": f"{n}-scorer", "weight": w} for n, _, w in scorers]}]},
        context={"registry": registry},
    )
    return build_scheduler(cfg, make_datastore(), rng=random.Random(0), registry=registry)


def test_all_zero_scores_leave_totals_unchanged_and_are_still_reported() -> None:
    sched = _custom_scheduler(("x", [0.1, 0.7, 0.3], 3.0), ("zero", [0.0, -0.0, 0.0], 2.0))
    decision = sched.schedule(_req())  # type: ignore[attr-defined]
    by_name = {c.endpoint: c for c in decision.ranked}
    assert [by_name[e].score for e in "abc"] == [0.0 + 3.0 * v for v in (0.1, 0.7, 0.3)]
    assert by_name["b"].scores == {"x": 0.7, "zero": 0.0}
    assert "zero" in decision.timings


def test_a_scorer_returning_the_wrong_number_of_scores_is_an_error() -> None:
    sched = _custom_scheduler(("short", [0.5, 0.5], 1.0))
    with pytest.raises(ValueError, match="short"):
        sched.schedule(_req())  # type: ignore[attr-defined]


def test_eligible_narrows_every_pick_and_an_empty_subset_is_503_not_404() -> None:
    ds = make_datastore()
    ds.begin("b", 1, 1)  # b is the loaded one: a free endpoint outside the subset must still lose
    sched = build_scheduler(RoutingConfig(), ds, rng=random.Random(3))
    for _ in range(50):
        decision = sched.schedule(_req(eligible=frozenset({"b"})))
        assert [c.endpoint for c in decision.ranked] == ["b"]
    ranked = sched.schedule(_req(eligible=frozenset({"a", "b", "zz"}))).ranked
    assert sorted(c.endpoint for c in ranked) == ["a", "b"]
    for subset in (frozenset(), frozenset({"zz"})):
        with pytest.raises(NoHealthyEndpoint):
            sched.schedule(_req(eligible=subset))
    with pytest.raises(ModelNotServed):
        sched.schedule(_req(model="other", eligible=frozenset({"a"})))


def test_the_scheduler_depends_on_plugin_protocols_not_on_plugins() -> None:
    # Producer outputs have a typed home (CycleContext.prefix / .latency); no consumer, the scheduler
    # included, imports a producer's module for a key.
    import ast
    from pathlib import Path

    import routing.scheduler

    tree = ast.parse(Path(routing.scheduler.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    plugins = {m for m in imported if m.startswith("routing.plugins.")}
    assert plugins <= {"routing.plugins.base", "routing.plugins.registry"}


def test_the_prefix_match_reaches_uncached_tokens_through_the_context() -> None:
    ds = make_datastore(["a", "b"])
    sched = build_scheduler(RoutingConfig(), ds, rng=random.Random(0))
    req = RoutingRequest(model="m", prompt=b"x" * 4096, prompt_tokens=1000)
    first = sched.schedule(req)
    assert [c.uncached_tokens for c in first.ranked] == [1000, 1000]
    sched.observe(req, first.best.endpoint)
    again = sched.schedule(req)
    cached = {c.endpoint: c.uncached_tokens for c in again.ranked}
    assert cached[first.best.endpoint] == 0 and cached[next(e for e in cached if e != first.best.endpoint)] == 1000
