"""Applying events in both key modes: stores, removals, clears, restarts, resyncs, orphans, sequences."""
from __future__ import annotations

from routing.kv.state import ROOT_KEY, KVEventState, SequenceTracker, token_block_keys
from routing.kv.wire import Batch, Cleared, Removed, Stored

TOKENS = list(range(64))


def _stored(hashes: list[int], parent: int | None, tokens: list[int], extra: list[object] | None = None) -> Stored:
    return Stored(hashes, parent, tokens, 16, None, "GPU", extra)


def test_engine_mode_keys_by_engine_hash() -> None:
    st = KVEventState("engine", clock=lambda: 0.0)
    st.apply("a", Batch(0.0, [_stored([10, 11], None, TOKENS[:32]), _stored([12], 11, TOKENS[32:48])]))
    assert st.index.matched_blocks([10, 11, 12], ["a"]) == {"a": 3}
    st.apply("a", Batch(0.0, [Removed([11])]))
    assert st.index.matched_blocks([10, 11, 12], ["a"]) == {"a": 1}
    assert st.fed("a") and st.block_size("a") == 16


def test_tokens_mode_keys_by_token_ids_whatever_the_engine_hash() -> None:
    st = KVEventState("tokens", clock=lambda: 0.0)
    # Two engines hashing the same tokens differently (different algorithm or seed) agree on keys.
    st.apply("a", Batch(0.0, [_stored([111, 222], None, TOKENS[:32]), _stored([333], 222, TOKENS[32:48])]))
    st.apply("b", Batch(0.0, [_stored([9, 8], None, TOKENS[:32])]))
    keys = token_block_keys(ROOT_KEY, TOKENS, 16)
    assert st.index.matched_blocks(keys, ["a", "b"]) == {"a": 3, "b": 2}
    # BlockRemoved names the engine's hash: the map translates it.
    st.apply("a", Batch(0.0, [Removed([222])]))
    assert st.index.matched_blocks(keys, ["a", "b"]) == {"a": 1, "b": 2}
    # A block whose parent the gateway never saw cannot be keyed: counted, not guessed.
    st.apply("b", Batch(0.0, [_stored([7], 12345, TOKENS[32:48])]))
    assert st.endpoint("b").orphan_blocks == 1  # type: ignore[union-attr]


def test_salt_and_lora_separate_keys_like_the_engine() -> None:
    st = KVEventState("tokens", clock=lambda: 0.0)
    st.apply("a", Batch(0.0, [_stored([1, 2], None, TOKENS[:32], [["t1"], None])]))
    plain = token_block_keys(ROOT_KEY, TOKENS[:32], 16)
    salted = token_block_keys(ROOT_KEY, TOKENS[:32], 16, [["t1"], None])
    assert st.index.matched_blocks(plain, ["a"]) == {"a": 0}
    assert st.index.matched_blocks(salted, ["a"]) == {"a": 2}


def test_clear_restart_and_resync_forget_the_endpoint_resync_marks_it_cold() -> None:
    now = [0.0]
    st = KVEventState("engine", cold_s=10, clock=lambda: now[0])
    for step in (lambda: st.apply("a", Batch(0.0, [Cleared()])), lambda: st.restarted("a"), lambda: st.resync("a")):
        st.apply("a", Batch(0.0, [_stored([1], None, TOKENS[:16])]))
        st.apply("b", Batch(0.0, [_stored([1], None, TOKENS[:16])]))
        step()
        assert st.index.holders(1) == {"b": "GPU"}
    assert st.cold("a") and not st.cold("b")
    now[0] = 11.0
    assert not st.cold("a")
    ep = st.endpoint("a")
    assert ep is not None and (ep.clears, ep.restarts, ep.resyncs) == (1, 1, 1)


def test_sequence_tracker() -> None:
    t = SequenceTracker()
    assert t.see(5) == "first"
    assert t.see(6) == "next"
    assert t.see(9) == "gap" and t.last == 6
    t.accept(9)
    assert t.see(0) == "restart" and t.last == 0
    assert t.see(3) == "gap"
    t.accept(3)
    assert t.see(2) == "restart"  # went back without reaching 0: the new engine's first batches were lost
