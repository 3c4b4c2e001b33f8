"""The sweep's case space: deterministic per seed, inside its documented ranges, splits disjoint."""
from __future__ import annotations

import pytest

from routing.eval.sweep_space import HELD_OUT_SEEDS, RANGES, TUNING_SEEDS, draw_case

SEEDS = (1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144)


@pytest.fixture(scope="module")
def cases() -> list:  # type: ignore[type-arg]
    return [draw_case(s) for s in SEEDS]


def test_same_seed_same_case_and_different_seeds_differ(cases: list) -> None:  # type: ignore[type-arg]
    assert draw_case(SEEDS[0]).key == cases[0].key
    assert len({c.key for c in cases}) == len(cases)


def test_cases_stay_inside_the_documented_ranges(cases: list) -> None:  # type: ignore[type-arg]
    for c in cases:
        assert 4 <= c.backends <= 16
        assert set(c.fleet.profiles) <= {"h100-8b", "a100-8b"}
        assert all(kv % 16 == 0 for kv in c.fleet.kv_tokens)
        # Every replica, the half-KV one too, can hold the case's longest request with room to spare.
        longest = c.workload.longest_prompt() + c.workload.output_cap()
        assert min(c.fleet.kv_tokens) >= longest
        assert max(c.fleet.kv_tokens) <= 30_720 * 16
        assert len(set(c.fleet.kv_tokens)) <= 2
        if len(set(c.fleet.kv_tokens)) == 2:
            assert sorted(c.fleet.kv_tokens).count(min(c.fleet.kv_tokens)) == 1
        assert c.workload.longest_prompt() <= 64_000 or c.workload.steps[0] == c.workload.steps[1]


def test_the_space_covers_its_kinds(cases: list) -> None:  # type: ignore[type-arg]
    assert len({c.workload.structure for c in cases}) >= 4
    assert any(c.fleet.mixed for c in cases) and any(not c.fleet.mixed for c in cases)


def test_tuning_and_held_out_seeds_are_disjoint_halves() -> None:
    assert set(TUNING_SEEDS).isdisjoint(HELD_OUT_SEEDS)
    assert len(TUNING_SEEDS) == len(HELD_OUT_SEEDS) == 100
    assert {"structure", "kv", "fleet", "arrivals", "loads"} <= set(RANGES)


def test_requests_override_changes_the_key() -> None:
    assert draw_case(3, requests=50).key != draw_case(3).key
    assert draw_case(3, requests=50).workload.requests == 50
