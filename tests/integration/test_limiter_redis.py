"""policies/limiter.py on a real redis-server: guarantees that hold whatever the caller passes."""
from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from policies.config import Limits, RateLimitConfig, TenantConfig
from policies.errors import RateLimited
from policies.keys import ApiKey
from policies.limiter import Limiter
from tests.support.procs import Proc

KEY = ApiKey(sha256="ef" * 32, name="k", tenant="acme")
TENANTS = {"acme": TenantConfig(limits=Limits(concurrency=2))}


@pytest.fixture
async def limiter(redis_server: Proc) -> AsyncIterator[Limiter]:
    client = aioredis.Redis(port=redis_server.port)
    lim = Limiter(RateLimitConfig(), TENANTS)
    lim.attach(client)
    try:
        yield lim
    finally:
        await lim.close()
        await client.aclose()


async def test_a_repeated_request_id_takes_a_slot_of_its_own(limiter: Limiter) -> None:
    lim = limiter
    held = []
    refused = 0
    for _ in range(10):
        try:
            r = await lim.reserve(KEY, "m", "same-id", 1)
        except RateLimited:
            refused += 1
        else:
            assert r is not None and r.where == "redis"
            held.append(r)
    assert (len(held), refused) == (2, 8)
    # Settling one frees exactly one slot, not every reservation that shared its id.
    await lim.settle(held[0], 1)
    assert await lim.reserve(KEY, "m", "same-id", 1) is not None
    with pytest.raises(RateLimited):
        await lim.reserve(KEY, "m", "same-id", 1)
