"""ratelimit.lua in a real redis-server agrees with policies/bucket.py, decision by decision."""
from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies.bucket import MemoryState, Scope, Verdict, decide, settle, settle_many
from policies.config import Limits
from policies.limiter import LUA_SHA, LUA_SOURCE
from tests.support.procs import Proc


@pytest.fixture(scope="module")
def lua(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[redis.Redis, object]]:
    from tests.support.procs import start_redis

    proc: Proc = start_redis(tmp_path_factory.mktemp("lua"))
    client = redis.Redis(port=proc.port)
    client.script_load(LUA_SOURCE)
    try:
        yield client, client.register_script(LUA_SOURCE)
    finally:
        client.close()
        proc.stop()


SCOPES = [
    Scope("key", "rl:{t}:k", "rl:{t}:k:c", Limits(tpm=300, rpm=5, concurrency=3)),
    Scope("tenant", "rl:{t}:t", "rl:{t}:t:c", Limits(tpm=500, tpd=2000)),
]


def _reserve(now: float, rid: str, cost: int) -> list[object]:
    return ["reserve", repr(now), rid, 60_000, cost, *(s.packed_caps for s in SCOPES)]


def _settle(now: float, batch: list[tuple[str, int, int]]) -> list[object]:
    out: list[object] = ["settle", repr(now)]
    for s in SCOPES:
        out += [s.packed_caps, len(batch)]
        for entry in batch:
            out += entry
    return out


LEAD_MS = 100
"""Added to every TTL the test replays into Redis, so Redis's own clock expires nothing early."""


def _replay_expiry(pipe: Any, state: MemoryState, keys: list[str], now: float) -> None:
    """Bring Redis's TTLs to the model's at `now`, in the MULTI that then runs the script.

    The script takes `now` from the test, but Redis expires keys by its own clock, which the test
    cannot move: so before each call the test deletes what the model says has expired by `now` and
    sets every other key's TTL to what the model says is left (plus LEAD_MS). After the call the TTLs
    the script set are read back in the same MULTI and compared with the model's.
    """
    for k in keys:
        left = state.pttl(k, now)
        if left == -2:
            pipe.delete(k)
        elif left == -1:
            pipe.persist(k)
        else:
            pipe.pexpire(k, int(left) + LEAD_MS)


def _call(client: redis.Redis, state: MemoryState, keys: list[str], now: float) -> Any:
    """A MULTI holding the model's expiry at `now` (taken before the model runs the same operation)."""
    pipe = client.pipeline(transaction=True)
    _replay_expiry(pipe, state, keys, now)
    return pipe


def _run(pipe: Any, keys: list[str], args: list[object]) -> Any:
    """The script's reply, the TTLs read back, and how long the MULTI took (an upper bound on the
    Redis time that passed between setting a TTL and reading it)."""
    pipe.evalsha(LUA_SHA, len(keys), *keys, *args)
    for k in keys:
        pipe.pttl(k)
    started = time.perf_counter()
    out = pipe.execute()
    took_ms = (time.perf_counter() - started) * 1000
    return out[-1 - len(keys)], out[-len(keys):], took_ms


def _same_ttls(state: MemoryState, keys: list[str], now: float, got: list[int], took_ms: float) -> None:
    for k, ttl in zip(keys, got, strict=True):
        want = state.pttl(k, now)
        if want < 0 or ttl < 0:
            assert ttl == want, (k, ttl, want)
        else:
            # A TTL the script kept is the replayed one, LEAD_MS above the model's; every TTL has
            # run down by the time the MULTI read it (8 ms on a machine at load average 12).
            assert want - 5 - took_ms <= ttl <= want + LEAD_MS + 5, (k, ttl, want, took_ms)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.one_of(st.integers(0, 4000), st.integers(50_000, 200_000)), st.integers(1, 250),
                          st.integers(0, 300), st.sampled_from(["reserve", "settle"]), st.integers(1, 3)),
                min_size=1, max_size=40))
def test_lua_matches_the_python_model(lua: tuple[redis.Redis, object],
                                      ops: list[tuple[int, int, int, str, int]]) -> None:
    """Decision by decision, and every key's TTL after every call: the script and the model agree,
    the model expiring keys as Redis does. A batch of settlements in one call equals settle() on
    each, in order, at the same instant."""
    client, _ = lua
    client.flushdb()
    state, one_by_one = MemoryState(), MemoryState()
    keys = [k for s in SCOPES for k in (s.bucket_key, s.slots_key)]
    now, held = 1_000_000.0, list[tuple[str, int]]()
    for i, (dt, cost, used, op, batch_size) in enumerate(ops):
        now += dt
        if op == "settle" and held:
            batch: list[tuple[str, int, int]] = []
            for j in range(min(batch_size, len(held))):
                rid, reserved = held.pop(0)
                actual = (used + 97 * j) % 301
                settle(one_by_one, SCOPES, now, rid, reserved, actual)
                batch.append((rid, reserved, actual))
            pipe = _call(client, state, keys, now)
            settle_many(state, SCOPES, now, batch)
            _, ttls, took_ms = _run(pipe, keys, _settle(now, batch))
            _same_ttls(state, keys, now, ttls, took_ms)
            continue
        pipe = _call(client, state, keys, now)
        want = decide(state, SCOPES, now, str(i), cost, 60_000)
        assert decide(one_by_one, SCOPES, now, str(i), cost, 60_000) == want
        reply, ttls, took_ms = _run(pipe, keys, _reserve(now, str(i), cost))
        assert Verdict.from_reply(reply) == want
        _same_ttls(state, keys, now, ttls, took_ms)
        if want.allowed:
            held.append((str(i), cost))
    for s in SCOPES:
        stored = {str(k, "utf-8") if isinstance(k, bytes) else k: float(v)
                  for k, v in client.hgetall(s.bucket_key).items()}
        assert set(stored) == set(state.buckets.get(s.bucket_key, {}))
        for field, value in state.buckets.get(s.bucket_key, {}).items():
            assert math.isclose(stored[field], value, rel_tol=1e-12, abs_tol=1e-9), field
            assert math.isclose(one_by_one.buckets[s.bucket_key][field], value, rel_tol=1e-12, abs_tol=1e-9)
        assert client.zcard(s.slots_key) == len(state.slots.get(s.slots_key, {}))


def test_server_time_is_used_when_no_clock_is_given(lua: tuple[redis.Redis, object]) -> None:
    client, script = lua
    client.flushdb()
    keys = [k for s in SCOPES for k in (s.bucket_key, s.slots_key)]
    args = _reserve(0, "x", 10)
    args[1] = ""
    v = Verdict.from_reply(script(keys=keys, args=args))  # type: ignore[operator]
    assert v.allowed and v.remaining_tokens == 290
    ts = float(client.hget("rl:{t}:k", "ts") or 0)
    server_ms = client.time()[0] * 1000
    assert abs(ts - server_ms) < 5_000
    assert 0 < client.pttl("rl:{t}:k") <= 61_000


def test_the_request_level_outlives_a_settlement_in_real_time(lua: tuple[redis.Redis, object]) -> None:
    """Redis's own clock and expiry, no replayed TTLs: a settlement that refunds a large TPM must
    not let the hash (and the request level in it) expire when the token level is full (~1 s)."""
    client, script = lua
    client.flushdb()
    s = Scope("key", "rl:{rt}:k", "rl:{rt}:k:c", Limits(tpm=10_000_000, rpm=1))
    keys = [s.bucket_key, s.slots_key]
    first = Verdict.from_reply(script(keys=keys, args=["reserve", "", "a", 60_000, 100, s.packed_caps]))  # type: ignore[operator]
    assert first.allowed
    script(keys=keys, args=["settle", "", s.packed_caps, 1, "a", 100, 10])  # type: ignore[operator]
    assert client.pttl(s.bucket_key) > 59_000  # one request takes a minute to come back
    time.sleep(1.5)
    again = Verdict.from_reply(script(keys=keys, args=["reserve", "", "b", 60_000, 100, s.packed_caps]))  # type: ignore[operator]
    assert not again.allowed and again.failed_kind == "r"
