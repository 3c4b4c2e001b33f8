"""Workload generators of the sweep: arrival processes, output lengths, sharing structures, working set."""
from __future__ import annotations

import dataclasses
import itertools
import statistics

import pytest

from routing.eval.generators import (
    ISSUE_WORKLOADS,
    STRUCTURES,
    ArrivalSpec,
    OutputSpec,
    WorkloadSpec,
    arrival_times,
    generate_spec,
    output_lengths,
    reusable_tokens,
)
from routing.eval.trace import PromptEncoder
from routing.eval.workloads import WorkloadOptions, generate

SMALL = {"prefix_tokens": (40, 60), "system_tokens": (20, 30), "question_tokens": (5, 10),
         "tool_tokens": (10, 20), "hot_tokens": (30, 40)}


def _spec(structure: str, **kw: object) -> WorkloadSpec:
    return dataclasses.replace(WorkloadSpec(structure, requests=60, groups=4), **{**SMALL, **kw})  # type: ignore[arg-type]


def test_poisson_arrivals_keep_the_mean_rate() -> None:
    import random

    times = arrival_times(random.Random(1), 4000, 20.0, ArrivalSpec("poisson"))
    assert times == sorted(times)
    assert times[-1] == pytest.approx(200.0, rel=0.05)


def test_on_off_arrivals_fall_only_inside_bursts_at_the_same_mean_rate() -> None:
    import random

    spec = ArrivalSpec("onoff", on_s=1.0, off_s=3.0)
    times = arrival_times(random.Random(2), 2000, 10.0, spec)
    assert all(t % 4.0 < 1.0 for t in times)
    assert times[-1] == pytest.approx(200.0, rel=0.08)


def test_a_ramp_is_denser_at_the_end() -> None:
    import random

    times = arrival_times(random.Random(3), 3000, 10.0, ArrivalSpec("ramp", ramp_from=0.2))
    half = times[-1] / 2
    assert sum(t > half for t in times) > 1.5 * sum(t <= half for t in times)


@pytest.mark.parametrize("kind", ["fixed", "uniform", "exp", "bimodal"])
def test_output_lengths_have_the_mean_and_stay_positive(kind: str) -> None:
    import random

    out = output_lengths(random.Random(4), 5000, OutputSpec(kind, 100))
    assert min(out) >= 1
    assert statistics.mean(out) == pytest.approx(100, rel=0.12)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_every_structure_yields_the_requested_sorted_trace(structure: str) -> None:
    records = generate_spec(_spec(structure), rate=5.0, seed=1)
    assert len(records) == 60
    assert [r.t for r in records] == sorted(r.t for r in records)
    assert all(r.max_tokens >= 1 for r in records)


def test_shared_texts_depend_on_the_seed_not_the_rate() -> None:
    # The capacity search probes one seed at many rates: its prefixes must stay the same.
    def systems(rate: float, seed: int) -> set[str]:
        return {r.messages[0]["content"] for r in generate_spec(_spec("flat"), rate, seed) if r.messages}

    assert systems(2.0, 7) == systems(50.0, 7)
    assert systems(2.0, 7) != systems(2.0, 8)


def test_agent_histories_grow_by_prefix_so_the_cache_can_reuse_them() -> None:
    records = generate_spec(_spec("agent", steps=(4, 4), think_s=(0.1, 0.2)), 5.0, seed=3)
    enc = PromptEncoder()
    by_session: dict[str, list[list[int]]] = {}
    for r in records:
        assert r.session is not None
        by_session.setdefault(r.session, []).append(enc.encode(r)[1])
    grown = 0
    for prompts in by_session.values():
        for a, b in itertools.pairwise(prompts):
            assert len(b) > len(a) and b[: len(a)] == a
            grown += 1
    assert grown > 10


def test_hot_share_adds_sessionless_chat() -> None:
    records = generate_spec(_spec("agent", hot_share=0.5), 5.0, seed=1, requests=400)
    share = sum(r.session is None for r in records) / len(records)
    assert 0.35 < share < 0.65


def test_zipf_skews_popularity() -> None:
    def top_share(zipf: float) -> float:
        records = generate_spec(_spec("flat", zipf=zipf, groups=8), 5.0, seed=2, requests=800)
        counts: dict[str, int] = {}
        for r in records:
            assert r.messages is not None
            counts[r.messages[0]["content"]] = counts.get(r.messages[0]["content"], 0) + 1
        return max(counts.values()) / len(records)

    assert top_share(0.0) < 0.2
    assert top_share(1.5) > 0.35


def test_tree_documents_hang_under_their_system_prompt() -> None:
    records = generate_spec(_spec("tree", systems=2, groups=6), 5.0, seed=1)
    parent: dict[str, str] = {}
    for r in records:
        assert r.messages is not None and len(r.messages) == 3
        system, doc = r.messages[0]["content"], r.messages[1]["content"]
        assert parent.setdefault(doc, system) == system
    assert len(set(parent.values())) == 2


def test_reusable_tokens_is_what_recurs() -> None:
    assert reusable_tokens(generate_spec(_spec("none"), 5.0, seed=1)) == 0
    flat = generate_spec(_spec("flat", prefix_tokens=(400, 400), groups=2), 5.0, seed=1)
    # Both prefixes plus the template's shared opening; no question recurs.
    assert 2 * 400 <= reusable_tokens(flat) <= 2 * 400 + 64


def test_longest_prompt_bounds_every_prompt() -> None:
    enc = PromptEncoder()
    for structure in STRUCTURES:
        spec = _spec(structure, steps=(3, 6), hot_share=0.3 if structure == "agent" else 0.0)
        longest = max(len(enc.encode(r)[1]) for r in generate_spec(spec, 5.0, seed=5))
        assert longest <= spec.longest_prompt(), structure


def test_unknown_structure_and_arrivals_are_rejected() -> None:
    import random

    with pytest.raises(ValueError, match="structure"):
        WorkloadSpec("forest")
    with pytest.raises(ValueError, match="arrival"):
        arrival_times(random.Random(0), 3, 1.0, ArrivalSpec("bursty"))


@pytest.mark.parametrize("name", sorted(ISSUE_WORKLOADS))
def test_the_issues_traces_are_named_workloads(name: str) -> None:
    records = generate(name, WorkloadOptions(seed=1, requests=30, rate=4.0))
    assert len(records) == 30


@pytest.mark.parametrize("structure", ["agent", "chat"])
def test_session_traces_run_at_the_steady_rate_from_the_start(structure: str) -> None:
    # Sessions live ~40 s here, longer than the trace: without a warm start the first part would
    # be a ramp and a capacity probe would measure the ramp.
    spec = _spec(structure, steps=(8, 12), think_s=(2.0, 4.0))
    records = generate_spec(spec, rate=10.0, seed=4, requests=300)
    span = records[-1].t
    first = sum(r.t < span / 4 for r in records)
    last = sum(r.t >= 3 * span / 4 for r in records)
    assert span == pytest.approx(30.0, rel=0.2)
    assert first == pytest.approx(last, rel=0.3)
