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


def _args(mode: str, now: float, rid: str, cost: int, actual: int) -> list[object]:
    out: list[object] = [mode, repr(now), rid, 60_000, cost, actual]
    out.extend(s.packed_caps() for s in SCOPES)
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 4000), st.integers(1, 250), st.integers(0, 300),
                          st.sampled_from(["reserve", "settle"])), min_size=1, max_size=40))
def test_lua_matches_the_python_model(lua: tuple[redis.Redis, object],
                                      ops: list[tuple[int, int, int, str]]) -> None:
    client, script = lua
    client.flushdb()
    state = MemoryState()
    keys = [k for s in SCOPES for k in (s.bucket_key, s.slots_key)]
    now, held = 1_000_000.0, []
    for i, (dt, cost, used, op) in enumerate(ops):
        now += dt
        if op == "settle" and held:
            rid, reserved = held.pop(0)
            settle(state, SCOPES, now, rid, reserved, used)
            script(keys=keys, args=_args("settle", now, rid, reserved, used))  # type: ignore[operator]
            continue
        want = decide(state, SCOPES, now, str(i), cost, 60_000)
        got = Verdict.from_reply(script(keys=keys, args=_args("reserve", now, str(i), cost, 0)))  # type: ignore[operator]
        assert got == want
        if want.allowed:
            held.append((str(i), cost))
    for s in SCOPES:
        stored = {k.decode(): float(v) for k, v in client.hgetall(s.bucket_key).items()}
        for field, value in state.buckets.get(s.bucket_key, {}).items():
            assert math.isclose(stored[field], value, rel_tol=1e-12, abs_tol=1e-9), field
        assert client.zcard(s.slots_key) == len(state.slots.get(s.slots_key, {}))


def test_server_time_is_used_when_no_clock_is_given(lua: tuple[redis.Redis, object]) -> None:
    client, script = lua
    client.flushdb()
    keys = [k for s in SCOPES for k in (s.bucket_key, s.slots_key)]
    args = _args("reserve", 0, "x", 10, 0)
    args[1] = ""
    v = Verdict.from_reply(script(keys=keys, args=args))  # type: ignore[operator]
    assert v.allowed and v.remaining_tokens == 290
    ts = float(client.hget("rl:{t}:k", "ts") or 0)
    server_ms = client.time()[0] * 1000
    assert abs(ts - server_ms) < 5_000
    assert 0 < client.pttl("rl:{t}:k") <= 61_000
