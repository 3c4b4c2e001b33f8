"""Table-driven tests for every built-in filter and scorer."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest

from routing.plugins.base import CycleContext
from routing.plugins.healthy import HealthyFilter, HealthyParams
from routing.plugins.kv_cache import KVCacheScorer
from routing.plugins.least_request import LeastRequestScorer
from routing.plugins.load_guard import LoadGuardParams, LoadGuardScorer
from routing.plugins.lora_affinity import LoraAffinityParams, LoraAffinityScorer
from routing.plugins.lora_capable import LoraCapableFilter
from routing.plugins.model_served import ModelServedFilter
from routing.plugins.queue import QueueParams, QueueScorer
from routing.plugins.session import SessionAffinityScorer
from routing.types import EndpointView
from tests.unit.routing.helpers import context, metrics, view

M = metrics
SCORER_CASES: list[tuple[str, Any, list[EndpointView], dict[str, Any], list[float]]] = [
    ("queue equal", QueueScorer("q", QueueParams()), [view("a"), view("b")], {}, [1.0, 1.0]),
    (
        "queue minmax counts waiting and in-flight",
        QueueScorer("q", QueueParams()),
        [view("a", inflight_requests=2), view("b", metrics=M(waiting=4), fresh=True), view("c")],
        {},
        [0.5, 0.0, 1.0],
    ),
    (
        "queue ignores stale waiting",
        QueueScorer("q", QueueParams()),
        [view("a", metrics=M(waiting=9), fresh=False), view("b", inflight_requests=1)],
        {},
        [1.0, 0.0],
    ),
    (
        "queue absolute",
        QueueScorer("q", QueueParams(mode="absolute", scale=4)),
        [view("a"), view("b", inflight_requests=4)],
        {},
        [1.0, 0.5],
    ),
    (
        "kv usage, unknown is neutral",
        KVCacheScorer("kv"),
        [view("a", metrics=M(kv_usage=0.25), fresh=True), view("b"), view("c", metrics=M(kv_usage=0.9), fresh=False)],
        {},
        [0.75, 0.5, 0.5],
    ),
    ("session hit", SessionAffinityScorer("s"), [view("a"), view("b")], {"session_endpoint": "b"}, [0.0, 1.0]),
    ("session none", SessionAffinityScorer("s"), [view("a"), view("b")], {}, [0.0, 0.0]),
    (
        "lora running > waiting > loadable > none",
        LoraAffinityScorer("l", LoraAffinityParams()),
        [
            view("a", metrics=M(loras_running=frozenset({"x"}), max_loras=1), fresh=True),
            view("b", metrics=M(loras_waiting=frozenset({"x"}), loras_running=frozenset({"y"}), max_loras=1), fresh=True),
            view("c", metrics=M(max_loras=2, loras_running=frozenset({"y"})), fresh=True),
            view("d", metrics=M(max_loras=1, loras_running=frozenset({"y"})), fresh=True),
        ],
        {"lora": "x"},
        [1.0, 0.8, 0.6, 0.0],
    ),
    ("lora absent is neutral", LoraAffinityScorer("l", LoraAffinityParams()), [view("a"), view("b")], {}, [1.0, 1.0]),
    (
        "least request",
        LeastRequestScorer("lr"),
        [view("a", inflight_requests=1), view("b", inflight_requests=3), view("c", inflight_requests=2)],
        {},
        [1.0, 0.0, 0.5],
    ),
    (
        "load guard tolerates, then falls off",
        LoadGuardScorer("g", LoadGuardParams(abs_threshold=4, rel_threshold=1.0)),
        [view("a"), view("b", inflight_requests=4), view("c", inflight_requests=6), view("d", inflight_requests=9)],
        {},
        [1.0, 1.0, 0.5, 0.0],
    ),
    (
        "load guard zeroes a full KV cache that is also busier",
        LoadGuardScorer("g", LoadGuardParams()),
        [view("a"), view("b", inflight_requests=1, metrics=M(kv_usage=0.99), fresh=True)],
        {},
        [1.0, 0.0],
    ),
]


@pytest.mark.parametrize(("case", "scorer", "views", "req", "expected"), SCORER_CASES, ids=[c[0] for c in SCORER_CASES])
def test_scorer(case: str, scorer: Any, views: list[EndpointView], req: dict[str, Any], expected: list[float]) -> None:
    ctx = context(*views, **req)
    assert list(scorer.score(ctx, views)) == pytest.approx(expected)


FilterFn = Callable[[CycleContext, list[EndpointView]], Sequence[EndpointView]]
FILTER_CASES: list[tuple[str, Any, list[EndpointView], dict[str, Any], list[str]]] = [
    ("model served", ModelServedFilter("f"), [view("a"), view("b", models=frozenset({"z"})), view("c", models=None)], {}, ["a"]),
    (
        "model served via adapter",
        ModelServedFilter("f"),
        [view("a", loras=frozenset({"m"}), models=frozenset({"base"})), view("b", models=frozenset({"z"}))],
        {},
        ["a"],
    ),
    (
        "healthy drops down, open circuit and stale, keeps never-scraped",
        HealthyFilter("f", HealthyParams()),
        [
            view("a"),
            view("b", healthy=False),
            view("c", circuit_open=True),
            view("d", metrics=M(), fresh=False),
            view("e", metrics=M(), fresh=True),
        ],
        {},
        ["a", "e"],
    ),
    (
        "healthy may tolerate stale metrics",
        HealthyFilter("f", HealthyParams(require_fresh_metrics=False)),
        [view("a", metrics=M(), fresh=False)],
        {},
        ["a"],
    ),
    ("lora capable no adapter", LoraCapableFilter("f"), [view("a"), view("b")], {}, ["a", "b"]),
    (
        "lora capable prefers registered",
        LoraCapableFilter("f"),
        [view("a", loras=frozenset({"x"})), view("b", metrics=M(max_loras=2)), view("c")],
        {"lora": "x"},
        ["a"],
    ),
    (
        "lora capable falls back to loaders",
        LoraCapableFilter("f"),
        [view("a"), view("b", metrics=M(max_loras=2)), view("c", metrics=M(loras_running=frozenset({"y"})))],
        {"lora": "x"},
        ["b"],
    ),
]


@pytest.mark.parametrize(("case", "flt", "views", "req", "expected"), FILTER_CASES, ids=[c[0] for c in FILTER_CASES])
def test_filter(case: str, flt: Any, views: list[EndpointView], req: dict[str, Any], expected: list[str]) -> None:
    ctx = context(*views, **req)
    assert [e.name for e in flt.filter(ctx, views)] == expected


def test_prefill_cost_reads_the_prefix_match_and_in_flight_prefill() -> None:
    from routing.plugins.prefill_cost import PREFIX_MATCH_KEY, PrefillCostParams, PrefillCostScorer

    scorer = PrefillCostScorer("c", PrefillCostParams(per_request_tokens=0, smoothing_tokens=100))
    views = [view("a", inflight_prompt_tokens=900, inflight_requests=1), view("b"), view("c")]
    ctx = context(*views, prompt_tokens=1000)
    ctx.scratch[PREFIX_MATCH_KEY] = {"a": 1.0, "b": 0.9}
    # costs: a = 900 queued + 0 uncached; b = 100 uncached; c = 1000 uncached
    assert scorer.costs(ctx, views) == pytest.approx([900.0, 100.0, 1000.0])
    assert scorer.score(ctx, views) == pytest.approx([200 / 1000, 1.0, 200 / 1100])
