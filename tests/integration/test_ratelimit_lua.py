"""ratelimit.lua in a real redis-server agrees with policies/bucket.py, decision by decision."""
from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies.bucket import MemoryState, Scope, Verdict, decide, settle
from policies.config import Limits
from policies.limiter import LUA_SOURCE
from tests.support.procs import Proc


@pytest.fixture(scope="module")
def lua(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[redis.Redis, object]]:
    from tests.support.procs import start_redis

    proc: Proc = start_redis(tmp_path_factory.mktemp("lua"))
    client = redis.Redis(port=proc.port)
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


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 4000), st.integers(1, 250), st.integers(0, 300),
                          st.sampled_from(["reserve", "settle"]), st.integers(1, 3)), min_size=1, max_size=40))
def test_lua_matches_the_python_model(lua: tuple[redis.Redis, object],
                                      ops: list[tuple[int, int, int, str, int]]) -> None:
    """A batch of settlements in one call equals settle() on each, in order, at the same instant."""
    client, script = lua
    client.flushdb()
    state = MemoryState()
    keys = [k for s in SCOPES for k in (s.bucket_key, s.slots_key)]
    now, held = 1_000_000.0, list[tuple[str, int]]()
    for i, (dt, cost, used, op, batch_size) in enumerate(ops):
        now += dt
        if op == "settle" and held:
            batch: list[tuple[str, int, int]] = []
            for j in range(min(batch_size, len(held))):
                rid, reserved = held.pop(0)
                actual = (used + 97 * j) % 301
                settle(state, SCOPES, now, rid, reserved, actual)
                batch.append((rid, reserved, actual))
            script(keys=keys, args=_settle(now, batch))  # type: ignore[operator]
            continue
        want = decide(state, SCOPES, now, str(i), cost, 60_000)
        got = Verdict.from_reply(script(keys=keys, args=_reserve(now, str(i), cost)))  # type: ignore[operator]
        assert got == want
        if want.allowed:
            held.append((str(i), cost))
    for s in SCOPES:
        stored = {str(k, "utf-8") if isinstance(k, bytes) else k: float(v)
                  for k, v in client.hgetall(s.bucket_key).items()}
        for field, value in state.buckets.get(s.bucket_key, {}).items():
            assert math.isclose(stored[field], value, rel_tol=1e-12, abs_tol=1e-9), field
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
