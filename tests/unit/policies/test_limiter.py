from __future__ import annotations

import asyncio
from typing import Any

import pytest

from policies.bucket import Verdict
from policies.config import Limits, RateLimitConfig, TenantConfig
from policies.errors import LimiterUnavailable, RateLimited
from policies.keys import ApiKey
from policies.limiter import LUA_SHA, Limiter, format_duration, ratelimit_headers

KEY = ApiKey(sha256="ab" * 32, name="k", tenant="acme", limits=Limits(tpm=100, rpm=10))
TENANTS = {"acme": TenantConfig(limits=Limits(concurrency=2), models={"m": Limits(tpd=1000)})}


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class DownRedis:
    """A client whose every script call fails the way a dead Redis does."""

    def __init__(self) -> None:
        self.calls = 0

    async def execute_command(self, *args: Any) -> Any:
        self.calls += 1
        raise ConnectionError("Connection refused")


class RecordingRedis:
    """Admits every reservation and records each EVALSHA as (mode, keys, the rest of ARGV)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str], list[Any]]] = []

    async def execute_command(self, *args: Any) -> Any:
        assert args[:2] == ("EVALSHA", LUA_SHA)
        n = args[2]
        keys, argv = list(args[3:3 + n]), list(args[3 + n:])
        self.calls.append((argv[0], keys, argv[2:]))
        return [1, 0, -1, b"", 10, 9, 6000, 100, 50, 30000] if argv[0] == "reserve" else 1


@pytest.mark.parametrize(("ms", "text"), [(0, "0ms"), (20, "20ms"), (1500, "1.5s"), (59_000, "59s"),
                                          (360_000, "6m0s"), (3_723_000, "1h2m3s")])
def test_reset_durations_use_openai_format(ms: int, text: str) -> None:
    assert format_duration(ms) == text


def test_headers_only_for_budgets_that_apply() -> None:
    v = Verdict(True, limit_tokens=100, remaining_tokens=40, reset_tokens_ms=36_000)
    assert ratelimit_headers(v) == {"x-ratelimit-limit-tokens": "100", "x-ratelimit-remaining-tokens": "40",
                                    "x-ratelimit-reset-tokens": "36s"}


def test_scopes_share_the_tenant_hash_tag() -> None:
    scopes = Limiter(RateLimitConfig(), TENANTS).scopes(KEY, "m")
    assert [s.label for s in scopes] == ["key", "tenant", "tenant model"]
    for s in scopes:
        for k in (s.bucket_key, s.slots_key):
            assert "{acme}" in k and KEY.sha256[12:] not in k  # only the public id, never the full hash
    assert Limiter(RateLimitConfig(), {}).scopes(ApiKey(sha256="", name="anon", tenant="x"), "m") == []
    assert Limiter(RateLimitConfig(enabled=False), TENANTS).scopes(KEY, "m") == []


async def test_fail_open_uses_a_local_limiter_then_retries_redis_later() -> None:
    clock, errors, redis = Clock(), [], DownRedis()
    lim = Limiter(RateLimitConfig(redis_retry_s=1.0), {}, clock=clock,
                  on_redis_error=lambda op, exc: errors.append(op))
    lim.attach(redis)
    r = await lim.reserve(KEY, "m", "a", 60)
    assert r is not None and r.where == "local" and errors == ["reserve"]
    # The local limiter enforces the same budget...
    with pytest.raises(RateLimited) as err:
        await lim.reserve(KEY, "m", "b", 60)
    assert err.value.retry_after and err.value.headers["x-ratelimit-remaining-tokens"] == "40"
    assert redis.calls == 1  # ...and Redis is left alone until redis_retry_s has passed
    await lim.settle(r, 0)
    assert (await lim.reserve(KEY, "m", "c", 60)) is not None
    clock.t = 2.0
    await lim.reserve(KEY, "m", "d", 1)
    assert redis.calls == 2


async def test_local_share_scales_each_limit() -> None:
    lim = Limiter(RateLimitConfig(local_share=0.5), {}, clock=Clock())
    lim.attach(DownRedis())
    assert await lim.reserve(KEY, "m", "a", 50) is not None
    with pytest.raises(RateLimited):
        await lim.reserve(KEY, "m", "b", 1)


async def test_fail_closed_refuses_with_503() -> None:
    lim = Limiter(RateLimitConfig(failure_mode="closed"), {}, clock=Clock())
    lim.attach(DownRedis())
    with pytest.raises(LimiterUnavailable) as err:
        await lim.reserve(KEY, "m", "a", 1)
    assert err.value.http_status == 503 and err.value.retry_after


async def test_refusal_message_and_headers_follow_openai() -> None:
    lim = Limiter(RateLimitConfig(), TENANTS, clock=Clock())
    lim.attach(DownRedis())
    await lim.reserve(KEY, "m", "a", 1)
    await lim.reserve(KEY, "m", "b", 1)
    with pytest.raises(RateLimited) as err:
        await lim.reserve(KEY, "m", "c", 1)
    e = err.value
    assert e.error_type == "requests" and e.code == "rate_limit_exceeded"
    assert "your organization on concurrent requests" in str(e)
    assert int(e.headers["retry-after-ms"]) == 1000
    assert e.headers["x-ratelimit-limit-requests"] == "10"


TOKENS_ONLY = {"acme": TenantConfig(limits=Limits(tpm=10_000), models={"m": Limits(tpd=1000)})}


async def test_a_settlement_that_frees_a_concurrency_slot_is_sent_at_once_even_when_batching() -> None:
    """A client that sends its next request when the answer arrives must find its slot free."""
    redis = RecordingRedis()
    lim = Limiter(RateLimitConfig(settle_interval_ms=1000), TENANTS)
    lim.attach(redis)
    settler = asyncio.create_task(lim.run_settler())
    await asyncio.sleep(0)
    a = await lim.reserve(KEY, "m", "a", 60)
    assert a is not None
    await lim.settle(a, 10)
    assert [c[0] for c in redis.calls] == ["reserve", "settle"]
    settler.cancel()
    with pytest.raises(asyncio.CancelledError):
        await settler


async def test_settlements_are_batched_per_tenant_and_flushed_on_stop() -> None:
    redis = RecordingRedis()
    lim = Limiter(RateLimitConfig(settle_interval_ms=1000), TOKENS_ONLY)
    lim.attach(redis)
    settler = asyncio.create_task(lim.run_settler())
    await asyncio.sleep(0)
    a = await lim.reserve(KEY, "m", "a", 60)
    b = await lim.reserve(KEY, "m", "b", 30)
    assert a is not None and b is not None and a.where == "redis"
    await lim.settle(a, 10)
    await lim.settle(b, 0)
    assert [c[0] for c in redis.calls] == ["reserve", "reserve"]  # queued, not sent
    settler.cancel()
    with pytest.raises(asyncio.CancelledError):
        await settler
    await lim.flush()  # what the lifespan does at shutdown
    mode, keys, argv = redis.calls[-1]
    assert mode == "settle" and len(redis.calls) == 3  # both requests, one call
    scopes = lim.scopes(KEY, "m")
    assert keys == [k for s in scopes for k in (s.bucket_key, s.slots_key)]
    assert argv == [x for s in scopes for x in (s.packed_caps, 2, a.member, 60, 10, b.member, 30, 0)]
    assert a.member != b.member and "a" not in (a.member, b.member)


async def test_settling_without_the_settler_is_immediate_and_skipped_when_it_changes_nothing() -> None:
    redis = RecordingRedis()
    lim = Limiter(RateLimitConfig(), {"acme": TenantConfig(limits=Limits(tpm=1000, rpm=5))})
    lim.attach(redis)
    key = ApiKey(sha256="cd" * 32, name="k", tenant="acme")
    r = await lim.reserve(key, "m", "a", 60)
    assert r is not None
    await lim.settle(r, 60)  # used exactly what it reserved, no slot held: nothing to correct
    assert [c[0] for c in redis.calls] == ["reserve"]
    await lim.settle(r, 59)
    assert [c[0] for c in redis.calls] == ["reserve", "settle"]


async def test_a_repeated_request_id_takes_a_slot_of_its_own_locally() -> None:
    lim = Limiter(RateLimitConfig(), {"acme": TenantConfig(limits=Limits(concurrency=2))}, clock=Clock())
    lim.attach(DownRedis())
    key = ApiKey(sha256="cd" * 32, name="k", tenant="acme")
    held = []
    for _ in range(2):
        r = await lim.reserve(key, "m", "same-id", 1)
        assert r is not None and r.where == "local"
        held.append(r)
    for _ in range(8):
        with pytest.raises(RateLimited):
            await lim.reserve(key, "m", "same-id", 1)
    await lim.settle(held[0], 1)
    assert await lim.reserve(key, "m", "same-id", 1) is not None
    with pytest.raises(RateLimited):
        await lim.reserve(key, "m", "same-id", 1)
