"""Pending marks shared between gateway replicas: another replica's pick counts as this one's own."""
from __future__ import annotations

from routing.kv.keys import RequestKeyer
from routing.kv.pending import ForeignMark, PendingExchange, pack_keys, unpack_keys
from routing.kv.state import KVEventState
from routing.kv.wire import Batch, Removed, Stored
from routing.plugins.precise_prefix import PreciseIndex
from routing.prefix import ApproxPrefixIndex
from tests.unit.routing.helpers import FakeClock
from tests.unit.routing.test_precise_prefix import IDS, ListTokenizer, _req


def _replica(state: KVEventState, clock: FakeClock, shared: bool = True) -> tuple[PreciseIndex, PendingExchange]:
    ex = PendingExchange(max_blocks=8)
    index = PreciseIndex(state, RequestKeyer(ListTokenizer(), "tokens"), ApproxPrefixIndex(64, 64, lambda e: 1000),
                         pending_ttl_s=5.0, clock=clock, exchange=ex if shared else None)
    return index, ex


def _fed(clock: FakeClock) -> KVEventState:
    state = KVEventState("tokens", clock=clock)
    for e in ("a", "b"):  # both publish events; neither holds the prompt yet
        state.apply(e, Batch(0.0, [Stored([70 + ord(e)], None, list(range(16)), 16)]))
    return state


def _relay(src: PendingExchange, dst: PendingExchange) -> None:
    dst.deliver([ForeignMark(e, unpack_keys(pack_keys(keys)), 1.0) for e, keys in src.take()])


def test_another_replicas_pick_counts_as_pending_here_and_ends_as_its_own_would() -> None:
    clock = FakeClock()
    state = _fed(clock)
    one, ex1 = _replica(state, clock)
    two, ex2 = _replica(state, clock)
    ex1.attach(lambda: None)
    ex2.attach(lambda: None)
    one.observe(_req(IDS), "a")
    assert two.match(_req(IDS), ["a", "b"]) == [0.0, 0.0]  # not delivered yet: blind
    _relay(ex1, ex2)
    # Only the first max_blocks (8) of the 10 unheld blocks travel: 8 x 16 of 160 tokens.
    assert two.match(_req(IDS), ["a", "b"]) == [0.8, 0.0]
    state.apply("a", Batch(0.0, [Removed([70 + ord("a")])]))  # unrelated eviction: marks stay
    assert two.match(_req(IDS), ["a", "b"]) == [0.8, 0.0]
    clock.now += 4.5  # the mark was 1 s old on arrival: it expires with the sender's, not 5 s after delivery
    assert two.match(_req(IDS), ["a", "b"]) == [0.0, 0.0]


def test_only_blocks_the_engine_does_not_hold_are_sent_and_nothing_without_a_publisher() -> None:
    clock = FakeClock()
    state = _fed(clock)
    state.apply("a", Batch(0.0, [Stored(list(range(1, 4)), None, IDS[:48], 16)]))  # a holds 3 blocks
    one, ex1 = _replica(state, clock)
    one.observe(_req(IDS), "a")
    assert ex1.take() == []  # no publisher attached: marks are not even recorded
    ex1.attach(lambda: None)
    one.observe(_req(IDS), "a")
    [(endpoint, keys)] = ex1.take()
    expected = RequestKeyer(ListTokenizer(), "tokens").keys(_req(IDS), 16)
    assert endpoint == "a" and keys == expected[3:3 + 8]


def test_keys_pack_to_eight_bytes_each() -> None:
    keys = [0, 1, 2**64 - 1, 0x0123456789ABCDEF]
    assert len(pack_keys(keys)) == 32 and unpack_keys(pack_keys(keys)) == keys


def test_the_inbox_and_outbox_are_bounded() -> None:
    ex = PendingExchange(max_outbox=3, max_inbox=2)
    ex.attach(lambda: None)
    for i in range(10):
        ex.mark("a", [i])
    assert [k for _, k in ex.take()] == [[7], [8], [9]]
    ex.deliver([ForeignMark("a", [i]) for i in range(5)])
    assert [m.keys for m in ex.pull()] == [[3], [4]] and ex.pull() == []
