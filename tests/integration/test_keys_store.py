"""The key store on a real redis-server: create, list, revoke, and nothing but hashes stored."""
from __future__ import annotations

import redis.asyncio as aioredis

from policies.config import Limits
from policies.keys import RedisKeyStore, hash_key
from tests.support.procs import Proc


async def test_redis_store_creates_lists_and_revokes(redis_server: Proc) -> None:
    client = aioredis.Redis(port=redis_server.port)
    try:
        store = RedisKeyStore(client)
        text, key = await store.create(name="ci", tenant="t", models=["m"], limits=Limits(rpm=3))
        other_text, _ = await store.create(name="bot", tenant="u")
        assert await store.get(hash_key(text)) == key
        assert {k.name for k in await store.all()} == {"ci", "bot"}
        # Only hashes are stored anywhere.
        for k in await client.keys("*"):
            assert text.encode() not in (await client.dump(k) or b"")
        assert await store.revoke(key.id[:6]) == []  # too short to be an id
        assert [k.name for k in await store.revoke(key.id)] == ["ci"]
        assert await store.get(key.sha256) is None
        assert [k.name for k in await store.revoke("bot")] == ["bot"]
        assert await store.all() == []
        assert other_text
    finally:
        await client.aclose()
