"""The block index: contiguous matches, removal, per-endpoint clears and the LRU cap."""
from __future__ import annotations

import pytest

from routing.kv.index import KVBlockIndex


def test_match_counts_leading_blocks_per_endpoint_and_stops_at_a_hole() -> None:
    idx = KVBlockIndex()
    idx.add("a", [1, 2, 3, 4])
    idx.add("b", [1, 2])
    idx.add("c", [2, 3])  # holds later blocks but not the first: no prefix hit
    assert idx.matched_blocks([1, 2, 3, 4, 5], ["a", "b", "c", "d"]) == {"a": 4, "b": 2, "c": 0, "d": 0}
    idx.remove("a", [3])
    assert idx.matched_blocks([1, 2, 3, 4], ["a"]) == {"a": 2}
    assert idx.matched_blocks([], ["a"]) == {"a": 0}


def test_cpu_blocks_count_less_but_do_not_break_the_run() -> None:
    idx = KVBlockIndex()
    idx.add("a", [1, 2, 3], "GPU")
    idx.add("a", [2], "CPU")
    assert idx.matched_blocks([1, 2, 3], ["a"], cpu_weight=0.5) == {"a": 2.5}
    assert idx.matched_blocks([1, 2, 3], ["a"], cpu_weight=1.0) == {"a": 3}


def test_clear_forgets_only_that_endpoint() -> None:
    idx = KVBlockIndex()
    idx.add("a", [1, 2])
    idx.add("b", [1])
    assert idx.clear("a") == 2
    assert idx.matched_blocks([1, 2], ["a", "b"]) == {"a": 0, "b": 1}
    assert len(idx) == 1 and idx.count("a") == 0


def test_cap_drops_the_least_recently_stored_key_everywhere() -> None:
    idx = KVBlockIndex(max_keys=3)
    idx.add("a", [1, 2, 3])
    idx.add("b", [1])  # a re-store refreshes key 1
    idx.add("a", [4])
    assert len(idx) == 3 and idx.evicted == 1
    assert idx.holders(2) == {}
    assert idx.holders(1) == {"a": "GPU", "b": "GPU"}
    assert idx.count("a") == 3  # 1, 3, 4
    with pytest.raises(ValueError):
        KVBlockIndex(0)
