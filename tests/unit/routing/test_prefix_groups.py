"""The prefix scorer's groups (first block or deepest seen prefix) and free cache, as the cost scorer sees them."""
from __future__ import annotations

import pytest

from routing.plugins.prefill_cost import PrefillCostParams, PrefillCostScorer
from routing.plugins.prefix_scorer import PrefixCacheScorer
from routing.prefix import ApproxPrefixIndex
from routing.types import PrefixMatch
from tests.unit.routing.helpers import FakeClock, context, view

BLOCK = 16
SYSTEM = b"S" * (4 * BLOCK)  # one system prompt...
DOCS = [bytes([65 + i]) * (12 * BLOCK) for i in range(6)]  # ...over documents of their own


def _scorer(deep: bool, capacity: int = 10_000, clock: FakeClock | None = None,
            free: bool = False) -> PrefixCacheScorer:
    return PrefixCacheScorer("p", ApproxPrefixIndex(BLOCK, 64, lambda _e: capacity, True), BLOCK,
                             seen_capacity=4096, clock=clock or FakeClock(0.0), share_window_s=10.0,
                             deep_groups=deep, capacity_of=(lambda _e: capacity) if free else None)


def _ask(scorer: PrefixCacheScorer, prompt: bytes, names: str = "ab") -> PrefixMatch:
    views = [view(n) for n in names]
    ctx = context(*views, prompt=prompt)
    scorer.score(ctx, views)
    assert ctx.prefix is not None
    return ctx.prefix


@pytest.mark.parametrize(("deep", "hot_share", "cold_share"), [(False, 1.0, 1.0), (True, 0.75, 0.25)])
def test_the_traffic_share_of_a_document_under_a_shared_system_prompt(
        deep: bool, hot_share: float, cold_share: float) -> None:
    # 3/4 of the requests ask about document A, 1/4 about B, all under one system prompt: by first block
    # both are one prefix with all the traffic; by deepest seen prefix each document has its own share.
    clock = FakeClock(0.0)
    scorer = _scorer(deep, clock=clock)
    for i in range(80):
        clock.now += 0.1
        doc = DOCS[1] if i % 4 == 0 else DOCS[0]
        prompt = SYSTEM + doc + b"question %03d" % i + b"?" * BLOCK
        _ask(scorer, prompt)
        scorer.observe(context(view("a"), prompt=prompt).request, "a")
    assert _ask(scorer, SYSTEM + DOCS[0] + b"new question" * 4).share == pytest.approx(hot_share, abs=0.05)
    assert _ask(scorer, SYSTEM + DOCS[1] + b"new question" * 4).share == pytest.approx(cold_share, abs=0.05)


def test_a_document_cached_nowhere_goes_home_while_its_system_prompt_is_cached_elsewhere() -> None:
    names = "abcdefgh"
    deep, flat = _scorer(True, capacity=200), _scorer(False, capacity=200)
    for scorer in (deep, flat):
        for doc in DOCS:  # every document seen once, then the index keeps only the system prompt
            req = context(view("a"), prompt=SYSTEM + doc + b"q" * BLOCK).request
            scorer.observe(req, "a")
        for i in range(60):  # a forgets them; b holds the system prompt under other questions
            scorer.observe(context(view("a"), prompt=b"other %04d" % i * 8).request, "a")
            scorer.observe(context(view("b"), prompt=SYSTEM + b"filler %04d" % i * 8).request, "b")
    homes = {}
    for doc in DOCS:
        asked = [_ask(deep, SYSTEM + doc + b"question %d" % k * 4, names) for k in range(3)]
        assert len({m.home for m in asked}) == 1 and asked[0].home is not None  # each request agrees
        assert asked[0].best > 0  # the system prompt is still cached (on b)
        homes[doc] = asked[0].home
        assert _ask(flat, SYSTEM + doc + b"question" * 4, names).home is None  # first block cached: no home
    assert len(set(homes.values())) > 1  # documents are spread over homes, not all on one


def test_a_copy_into_free_cache_pays_no_extra_miss_weight() -> None:
    # a has the prefix cached and its cache full; b is empty, c is full of other prompts.
    scorer = _scorer(False, capacity=40, free=True)
    prompt = b"P" * (16 * BLOCK)
    scorer.observe(context(view("a"), prompt=prompt + b"x" * (24 * BLOCK)).request, "a")
    for i in range(8):
        scorer.observe(context(view("c"), prompt=bytes([i]) * (8 * BLOCK)).request, "c")
    views = [view("a"), view("b"), view("c")]
    ctx = context(*views, prompt=prompt + b"q" * BLOCK, prompt_tokens=1000)
    scorer.score(ctx, views)
    assert ctx.prefix is not None and ctx.prefix.free == {"a": 0.0, "b": 1.0, "c": 0.0}
    costs = PrefillCostScorer("c", PrefillCostParams(home_fraction=0.0, hot_replication=False),
                              clock=lambda: 0.0).costs(ctx, views)
    hit = ctx.prefix.fraction("a")
    assert costs[1] == pytest.approx(1000.0)  # b recomputes the prompt, and evicts nothing for it
    assert costs[2] == pytest.approx(1000.0 + 4.0 * hit * 1000.0)  # c's copy would evict: weighted
    assert costs[0] < costs[1] < costs[2]


@pytest.mark.parametrize(("holder_free", "extra_paid"), [(0.0, 0.0), (0.75, 0.75), (1.0, 1.0)])
def test_with_pressure_a_free_copy_is_spared_only_as_far_as_the_holder_is_full(
        holder_free: float, extra_paid: float) -> None:
    # Where everything fits (the holder's cache mostly free) a copy evicts nothing but relieves nothing
    # either: it is recomputation, and pays the extra miss weight as before.
    views = [view("a"), view("b")]
    ctx = context(*views, prompt=b"x" * 64, prompt_tokens=1000)
    ctx.prefix = PrefixMatch({"a": 0.8, "b": 0.0}, None, 0.0, {"a": holder_free, "b": 1.0})
    costs = PrefillCostScorer("c", PrefillCostParams(home_fraction=0.0, hot_replication=False,
                                                     free_needs_pressure=True), clock=lambda: 0.0).costs(ctx, views)
    assert costs[1] == pytest.approx(1000.0 + extra_paid * 4.0 * 0.8 * 1000.0)
