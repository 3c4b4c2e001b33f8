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
from routing.types import EndpointView, PrefixMatch
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
        "healthy drops down and open circuit, keeps stale (load unknown) and never-scraped",
        HealthyFilter("f", HealthyParams()),
        [
            view("a"),
            view("b", healthy=False),
            view("c", circuit_open=True),
            view("d", metrics=M(), fresh=False),
            view("e", metrics=M(), fresh=True),
        ],
        {},
        ["a", "d", "e"],
    ),
    (
        "healthy may drop stale metrics",
        HealthyFilter("f", HealthyParams(require_fresh_metrics=True)),
        [view("a", metrics=M(), fresh=False), view("b", metrics=M(), fresh=True)],
        {},
        ["b"],
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
    from routing.plugins.prefill_cost import PrefillCostParams, PrefillCostScorer

    scorer = PrefillCostScorer(
        "c", PrefillCostParams(per_request_tokens=0, smoothing_tokens=100, miss_weight=1, home_fraction=0)
    )
    views = [view("a", inflight_prompt_tokens=900, inflight_requests=1), view("b"), view("c")]
    ctx = context(*views, prompt_tokens=1000)
    ctx.prefix = PrefixMatch({"a": 1.0, "b": 0.9})
    # costs: a = 900 queued + 0 uncached; b = 100 uncached; c = 1000 uncached
    assert scorer.costs(ctx, views) == pytest.approx([900.0, 100.0, 1000.0])
    assert scorer.score(ctx, views) == pytest.approx([200 / 1000, 1.0, 200 / 1100])


# (case, params, views, prefix match, home, expected costs); prompt is 1,000 tokens throughout.
COST_CASES: list[tuple[str, dict[str, float], list[EndpointView], dict[str, float], str | None, list[float]]] = [
    (
        "miss weight charges tokens beyond the best-cached endpoint's",
        {"miss_weight": 3},
        [view("a"), view("b"), view("c")],
        {"a": 1.0, "b": 0.5},
        None,
        [0.0, 500 + 2 * 500, 1000 + 2 * 1000],
    ),
    ("miss weight is neutral when nothing is cached", {"miss_weight": 5}, [view("a"), view("b")], {}, None, [1000, 1000]),
    (
        "miss weight still yields to a long queue",
        {"miss_weight": 2},
        [view("a", inflight_prompt_tokens=5000), view("b")],
        {"a": 1.0},
        None,
        [5000, 2000],
    ),
    (
        "home discount applies to the home only",
        {"home_fraction": 0.5},
        [view("a", inflight_prompt_tokens=300), view("b")],
        {},
        "a",
        [300 + 1000 - 500, 1000],
    ),
    ("home discount never goes below zero", {"home_fraction": 2}, [view("a"), view("b")], {}, "a", [0.0, 1000]),
    (
        "per-request and foreign waiting charges",
        {"per_request_tokens": 10, "waiting_tokens": 100},
        [view("a", inflight_requests=2, metrics=M(waiting=5), fresh=True), view("b")],
        {},
        None,
        [1000 + 20 + 300, 1000],
    ),
    (
        "waiting_floor_tokens: each waiting request, ours included, is at least that much queued work",
        {"per_request_tokens": 10, "waiting_tokens": 100, "waiting_floor_tokens": 300},
        [view("a", inflight_requests=2, inflight_prompt_tokens=200, metrics=M(waiting=2), fresh=True),
         view("b", inflight_requests=2, inflight_prompt_tokens=900, metrics=M(waiting=2), fresh=True)],
        {},
        None,
        [600 + 1000 + 20, 900 + 1000 + 20],
    ),
]


@pytest.mark.parametrize(
    ("case", "params", "views", "match", "home", "expected"), COST_CASES, ids=[c[0] for c in COST_CASES]
)
def test_prefill_cost(
    case: str, params: dict[str, float], views: list[EndpointView], match: dict[str, float], home: str | None,
    expected: list[float],
) -> None:
    from routing.plugins.prefill_cost import PrefillCostParams, PrefillCostScorer

    base = {"per_request_tokens": 0.0, "miss_weight": 1.0, "home_fraction": 0.0, "waiting_floor_tokens": 0.0}
    scorer = PrefillCostScorer("c", PrefillCostParams(**{**base, **params}))
    ctx = context(*views, prompt_tokens=1000)
    ctx.prefix = PrefixMatch(match, home)
    assert scorer.costs(ctx, views) == pytest.approx(expected)


def test_prefix_scorer_names_a_stable_home_only_when_nothing_is_cached() -> None:
    from routing.plugins.prefix_scorer import PrefixCacheScorer
    from routing.prefix import ApproxPrefixIndex

    index = ApproxPrefixIndex(16, 64, lambda _e: 1000)
    scorer = PrefixCacheScorer("p", index, home_block_size=16)
    views = [view(n) for n in ("a", "b", "c", "d")]
    prompt = b"group seven system prompt " * 4
    first = context(*views, prompt=prompt)
    scorer.score(first, views)
    assert first.prefix is not None
    home = first.prefix.home
    assert home is not None
    # Same first block, different tail: same home; the order of the candidates does not matter.
    again = context(*reversed(views), prompt=prompt[:16] + b"another question entirely")
    scorer.score(again, list(reversed(views)))
    assert again.prefix is not None and again.prefix.home == home
    # Once an endpoint holds the prefix, affinity takes over and there is no home.
    scorer.observe(first.request, "a")
    cached = context(*views, prompt=prompt)
    scorer.score(cached, views)
    assert cached.prefix is not None and cached.prefix.home is None and cached.prefix.fraction("a") > 0
    # Prompts shorter than a block have no home.
    short = context(*views, prompt=b"hi")
    scorer.score(short, views)
    assert short.prefix is not None and short.prefix.home is None


def test_home_only_for_a_prefix_seen_before_when_recurrence_is_required() -> None:
    from routing.plugins.prefix_scorer import PrefixCacheScorer
    from routing.prefix import ApproxPrefixIndex

    index = ApproxPrefixIndex(16, 64, lambda _e: 1000)
    scorer = PrefixCacheScorer("p", index, home_block_size=16, seen_capacity=8)
    views = [view(n) for n in ("a", "b", "c")]
    prompt = b"a one-off prompt, never repeated"
    one_off = context(*views, prompt=prompt)
    scorer.score(one_off, views)
    assert one_off.prefix is not None and one_off.prefix.home is None  # pure load balance for prompts that do not recur
    scorer.observe(one_off.request, "b")
    index.drop("b")  # evicted (restart): the prefix recurs but is cached nowhere, so it gets its home
    back = context(*views, prompt=prompt)
    scorer.score(back, views)
    assert back.prefix is not None and back.prefix.home in {"a", "b", "c"}


def test_rendezvous_spreads_keys_and_moves_only_the_removed_endpoints() -> None:
    from collections import Counter

    from routing.prefix import rendezvous

    names = [f"ep-{i}" for i in range(4)]
    owners = {k: rendezvous(k * 0x9E3779B97F4A7C15 & (2**64 - 1), names) for k in range(4000)}
    counts = Counter(owners.values())
    assert min(counts.values()) > 800  # ~1000 each
    fewer = names[:3]
    moved = [k for k, o in owners.items() if rendezvous(k * 0x9E3779B97F4A7C15 & (2**64 - 1), fewer) != o]
    assert all(owners[k] == "ep-3" for k in moved)


def test_a_cached_holder_whose_engine_queues_our_requests_for_kv_loses_to_an_idle_replica() -> None:
    # The holder has the whole prompt cached, so its queue holds almost no prefill work; but its engine
    # reports 8 of our requests waiting (KV full: they wait for running requests to finish decoding).
    # Counted only as prefill work the holder still looks cheapest; counted as waiting, it does not.
    # A queue of long uncached prompts is already costed by its prefill work: the floor adds nothing.
    from routing.plugins.prefill_cost import PrefillCostParams, PrefillCostScorer

    views = [view("holder", inflight_requests=10, inflight_prompt_tokens=400, metrics=M(waiting=8), fresh=True),
             view("idle")]
    ctx = context(*views, prompt_tokens=1000)
    ctx.prefix = PrefixMatch({"holder": 1.0})
    ours_only = PrefillCostScorer("c", PrefillCostParams(waiting_tokens=2048, waiting_floor_tokens=0))
    every = PrefillCostScorer("c", PrefillCostParams(waiting_floor_tokens=2048))
    assert ours_only.score(ctx, views)[0] > ours_only.score(ctx, views)[1]
    assert every.score(ctx, views)[0] < every.score(ctx, views)[1]
    prefill_bound = [view("holder", inflight_requests=10, inflight_prompt_tokens=40_000, metrics=M(waiting=8),
                          fresh=True), views[1]]
    assert every.costs(ctx, prefill_bound) == ours_only.costs(ctx, prefill_bound)


def test_prefill_cost_prefers_a_backlog_about_to_finish_over_a_fresh_one() -> None:
    # Both endpoints hold 2,000 prompt tokens awaiting prefill; a's began 0.45 s ago at a measured
    # 4,000 tok/s (200 left at the full rate, 740 at the default 0.7 of it), b's just now. Counting
    # raw tokens calls them equal.
    from routing.plugins.prefill_cost import PrefillCostParams, PrefillCostScorer

    now = 10.0
    views = [
        view("a", inflight_prompt_tokens=2000, prefill_anchor_at=now - 0.45, prefill_anchor_tokens=2000,
             prefill_tokens_per_s=4000.0),
        view("b", inflight_prompt_tokens=2000, prefill_anchor_at=now, prefill_anchor_tokens=2000,
             prefill_tokens_per_s=4000.0),
    ]
    ctx = context(*views, prompt_tokens=1000)
    params = {"per_request_tokens": 0, "home_fraction": 0}
    full = PrefillCostScorer("c", PrefillCostParams(**params, drain_rate_fraction=1), lambda: now)
    assert full.costs(ctx, views) == pytest.approx([200 + 1000, 2000 + 1000])
    default = PrefillCostScorer("c", PrefillCostParams(**params), lambda: now)
    assert default.costs(ctx, views) == pytest.approx([740 + 1000, 2000 + 1000])
    off = PrefillCostScorer("c", PrefillCostParams(**params, drain_rate_fraction=0), lambda: now)
    assert off.costs(ctx, views) == pytest.approx([3000, 3000])


def test_pending_prefill_is_the_fluid_estimate_clipped_to_the_raw_count() -> None:
    busy = view(inflight_prompt_tokens=1000, prefill_tokens_per_s=100.0, prefill_anchor_at=10.0,
                prefill_anchor_tokens=1500)
    assert busy.pending_prefill_tokens(11.0) == 1000.0  # 1400 left by the rate, never more than pending
    assert busy.pending_prefill_tokens(20.0) == 500.0
    assert busy.pending_prefill_tokens(30.0) == 0.0
    assert busy.pending_prefill_tokens(float("nan")) == 0.0
    assert view(inflight_prompt_tokens=0, prefill_tokens_per_s=100.0).pending_prefill_tokens(1.0) == 0.0


def test_load_guard_never_zeroes_the_idlest_even_when_its_kv_is_full() -> None:
    full = metrics(kv_usage=0.99, waiting=0)
    views = [view("a", metrics=full, fresh=True, inflight_requests=2), view("b", metrics=full, fresh=True,
                                                                              inflight_requests=3)]
    assert LoadGuardScorer("g", LoadGuardParams()).score(context(*views), views) == [1.0, 0.0]
