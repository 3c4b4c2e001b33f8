"""The limiter's arithmetic, by example and as properties (hypothesis)."""
from __future__ import annotations

import math

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from policies.bucket import MINUTE_MS, MemoryState, Scope, decide, level_at, settle
from policies.config import Limits


def scope(label: str = "key", **limits: int) -> Scope:
    return Scope(label, f"b:{label}", f"s:{label}", Limits(**limits))


def test_level_refills_linearly_up_to_the_cap() -> None:
    assert level_at(None, None, 5.0, 600, MINUTE_MS) == 600
    assert level_at(0.0, 0.0, 30_000.0, 600, MINUTE_MS) == 300
    assert level_at(0.0, 0.0, 10 * MINUTE_MS, 600, MINUTE_MS) == 600
    assert level_at(100.0, 50.0, 10.0, 600, MINUTE_MS) == 100  # a clock going back refills nothing


def test_reserve_then_refund_then_debt() -> None:
    state, s = MemoryState(), [scope(tpm=600, rpm=2)]
    v = decide(state, s, 0, "a", 500, 1000)
    assert v.allowed and v.remaining_tokens == 100 and v.remaining_requests == 1
    assert v.limit_tokens == 600 and v.reset_tokens_ms == 50_000
    refused = decide(state, s, 0, "b", 200, 1000)
    assert not refused.allowed and refused.failed_kind == "t" and refused.retry_after_ms == 10_000
    settle(state, s, 0, "a", 500, 100)  # used 100 of 500: 400 back
    assert decide(state, s, 0, "b", 200, 1000).allowed
    settle(state, s, 0, "b", 200, 1000)  # used 800 more than reserved: debt
    v = decide(state, s, 0, "c", 1, 1000)
    assert not v.allowed and v.remaining_tokens == 0


def test_requests_larger_than_the_bucket_wait_for_a_full_one() -> None:
    state, s = MemoryState(), [scope(tpm=100)]
    assert decide(state, s, 0, "big", 10_000, 1000).allowed  # clamped to the whole bucket
    settle(state, s, 0, "big", 10_000, 10_000)  # then settled as debt: 99 minutes to repay
    v = decide(state, s, 60_000, "next", 1, 1000)
    assert not v.allowed and v.retry_after_ms == 98 * 60_000 + 600


def test_concurrency_slots_are_leased_and_released() -> None:
    state, s = MemoryState(), [scope(concurrency=1)]
    assert decide(state, s, 0, "a", 1, 1000).allowed
    v = decide(state, s, 10, "b", 1, 1000)
    assert not v.allowed and v.failed_kind == "c" and v.retry_after_ms == 1000
    settle(state, s, 20, "a", 1, 1)
    assert decide(state, s, 30, "b", 1, 1000).allowed
    # A holder that never settles (its gateway died) frees the slot when its lease ends.
    assert decide(state, s, 1031, "c", 1, 1000).allowed


def test_every_scope_must_agree_and_the_first_refusal_is_named() -> None:
    state = MemoryState()
    scopes = [scope("key", tpm=1000), scope("tenant", tpm=100)]
    assert decide(state, scopes, 0, "a", 60, 1000).allowed
    before = {k: dict(v) for k, v in state.buckets.items()}
    v = decide(state, scopes, 0, "b", 60, 1000)
    assert not v.allowed and v.failed_scope == 1 and v.failed_kind == "t"
    assert state.buckets == before  # a refusal takes nothing anywhere
    assert v.remaining_tokens == 40  # headers describe the tightest bucket


# Deterministic on a loaded machine: no deadline (wall-clock), no too_slow health check (the time
# to generate examples, which a busy shared CPU can push over hypothesis's threshold: the cause of
# this file's one failure, never a counterexample: 30,000 random examples find none), and the same
# examples every run (derandomize) so a run's outcome depends on the code alone.
PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

ops = st.lists(st.tuples(
    st.integers(0, 5_000),  # ms since the previous operation
    st.integers(1, 400),  # tokens to reserve
    st.integers(0, 600),  # tokens the request really used
    st.booleans(),  # settle at once (True) or leave it in flight until the end
), min_size=1, max_size=60)


@PROPERTY
@given(ops=ops, tpm=st.integers(50, 2000))
def test_tokens_charged_stay_within_burst_plus_refill_plus_excess(
        ops: list[tuple[int, int, int, bool]], tpm: int) -> None:
    """Over any run: sum(actual of admitted) <= cap + rate*T + sum(excess over the clamped reservation).

    This is the documented worst case (docs/policies.md): the bucket can only lend what it holds,
    refill is linear, and usage beyond a reservation is the only overshoot.
    """
    state, s = MemoryState(), [scope(tpm=tpm)]
    now, charged, excess = 0.0, 0, 0
    pending: list[tuple[str, int, int]] = []
    for i, (dt, cost, used, settle_now) in enumerate(ops):
        now += dt
        v = decide(state, s, now, str(i), cost, 10**9)
        if not v.allowed:
            assert v.retry_after_ms > 0
            continue
        charged += used
        excess += max(0, used - min(cost, tpm))
        if settle_now:
            settle(state, s, now, str(i), cost, used)
        else:
            pending.append((str(i), cost, used))
    for rid, cost, used in pending:
        settle(state, s, now, rid, cost, used)
    assert charged <= tpm + now * tpm / MINUTE_MS + excess + 1e-6


@PROPERTY
@given(ops=ops, tpm=st.integers(50, 2000))
def test_level_never_exceeds_the_cap_and_refunds_restore_it(
        ops: list[tuple[int, int, int, bool]], tpm: int) -> None:
    state, s = MemoryState(), [scope(tpm=tpm)]
    now = 0.0
    for i, (dt, cost, _, _) in enumerate(ops):
        now += dt
        if decide(state, s, now, str(i), cost, 10**9).allowed:
            settle(state, s, now, str(i), cost, 0)  # a failed request: full refund
        h = state.buckets.get("b:key", {})
        assert h.get("t", tpm) <= tpm
    # Every request was refunded, so the bucket is full again at once.
    assert math.isclose(level_at(state.buckets.get("b:key", {}).get("t"), now, now, tpm, MINUTE_MS), tpm)


@settings(PROPERTY, max_examples=100)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 50)), max_size=80), st.integers(1, 5))
def test_in_flight_requests_never_exceed_the_concurrency_limit(steps: list[tuple[bool, int]], limit: int) -> None:
    state, s = MemoryState(), [scope(concurrency=limit)]
    held: list[str] = []
    now = 0.0
    for i, (admit, dt) in enumerate(steps):
        now += dt
        if admit or not held:
            if decide(state, s, now, str(i), 1, 10**9).allowed:
                held.append(str(i))
        else:
            settle(state, s, now, held.pop(0), 1, 1)
        assert len(held) <= limit


expiring_ops = st.lists(st.tuples(
    st.one_of(st.integers(0, 3_000), st.integers(20_000, 120_000)),  # ms since the previous operation
    st.booleans(),  # reserve (True) or settle the oldest request in flight
    st.integers(1, 400),  # tokens to reserve
    st.integers(0, 600),  # tokens the request really used
), min_size=1, max_size=60)


@PROPERTY
@given(ops=expiring_ops, tpm=st.integers(50, 10**6), rpm=st.integers(1, 50), tpd=st.integers(1_000, 10**7),
       concurrency=st.integers(1, 4))
# The reproduction: a large TPM refills within a second of a settlement, a small RPM does not.
@example(ops=[(0, True, 50, 10), (100, False, 0, 0), (2_000, True, 50, 10)], tpm=10**6, rpm=12, tpd=10**7,
         concurrency=2)
def test_expiry_never_changes_a_decision(ops: list[tuple[int, bool, int, int]], tpm: int, rpm: int, tpd: int,
                                         concurrency: int) -> None:
    """Redis deletes a bucket hash when its TTL runs out, and a missing bucket reads as full: so the
    TTL must never end before every level in the hash is full again. Checked by deciding the same
    operations on a state that expires keys as Redis does and on one that keeps them for ever."""
    limits = {"tpm": tpm, "rpm": rpm, "tpd": tpd, "concurrency": concurrency}
    s = [scope("key", **limits), scope("tenant", tpm=tpm, rpm=rpm)]
    expiring, kept = MemoryState(), MemoryState(expiry=False)
    now, held = 0.0, list[tuple[str, int, int]]()
    for i, (dt, reserve, cost, used) in enumerate(ops):
        now += dt
        if reserve or not held:
            v = decide(expiring, s, now, str(i), cost, 10**9)
            assert decide(kept, s, now, str(i), cost, 10**9) == v, i
            if v.allowed:
                held.append((str(i), cost, used))
        else:
            rid, cost, used = held.pop(0)
            settle(expiring, s, now, rid, cost, used)
            settle(kept, s, now, rid, cost, used)
