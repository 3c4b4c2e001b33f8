"""The store's scripts against a real redis-server: atomic commits, locks, TTLs, tenants."""
from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from gateway.config import StateConfig
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.state.keys import new_hex, response_id
from gateway.state.store import StateStore
from gateway.state.translate import chat_output_items, normalise_items


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[StateStore]:
    client = aioredis.Redis.from_url(redis_url)
    yield StateStore(lambda: client, StateConfig(redis_url=redis_url, ttl_s=60, max_conversation_items=6))
    await client.aclose()


async def _save(store: StateStore, tenant: str, text: str, previous: str | None = None,
                conversation: str | None = None, token: str = "") -> str:
    own = new_hex()
    thread = own
    if previous:
        thread = previous.removeprefix("resp_")[-32:]
    elif conversation:
        thread = conversation.removeprefix("conv_")
    rid = response_id(own, thread)
    await store.save_response(tenant, rid, thread, store=True, obj={"id": rid}, input_items=normalise_items(text, 999),
                              output_items=chat_output_items({"content": text.upper()}), previous_id=previous,
                              conversation_id=conversation, lock_token=token)
    return rid


async def test_chain_history_is_oldest_first_and_renews_ttl(store: StateStore) -> None:
    r1 = await _save(store, "t", "one")
    r2 = await _save(store, "t", "two", previous=r1)
    client = store._client()
    await client.pexpire(f"gravity:{{t/{r1[5:]}}}:resp:{r1}", 1000)
    texts = [i["content"][0]["text"] for i in await store.history("t", r2)]
    assert texts == ["one", "ONE", "two", "TWO"]
    assert await client.pttl(f"gravity:{{t/{r1[5:]}}}:resp:{r1}") > 1000
    with pytest.raises(NotFound):
        await store.history("other-tenant", r2)
    await store.delete_response("t", r1)
    with pytest.raises(NotFound, match="incomplete"):
        await store.history("t", r2)


async def test_conversation_lock_serialises_continuations(store: StateStore) -> None:
    conv = {"id": f"conv_{new_hex()}", "object": "conversation", "created_at": 0, "metadata": {}}
    await store.create_conversation("t", conv, normalise_items("hello", 999))
    assert len(await store.begin_conversation("t", conv["id"], "A")) == 1
    with pytest.raises(Conflict) as busy:
        await store.begin_conversation("t", conv["id"], "B")
    assert busy.value.status == 409 and busy.value.code == "conversation_locked"
    await _save(store, "t", "reply", conversation=conv["id"], token="A")  # commit releases the lock
    assert len(await store.begin_conversation("t", conv["id"], "B")) == 3
    with pytest.raises(Conflict):  # a holder whose lock was taken over appends nothing
        await _save(store, "t", "late", conversation=conv["id"], token="A")
    await store.release_conversation("t", conv["id"], "B")
    items, more = await store.list_items("t", conv["id"], after=None, limit=10, order="asc")
    assert [i["content"][0]["text"] for i in items] == ["hello", "reply", "REPLY"] and not more


async def test_conversation_item_limit_and_atomic_commit(store: StateStore) -> None:
    conv = {"id": f"conv_{new_hex()}", "object": "conversation", "created_at": 0, "metadata": {}}
    await store.create_conversation("t", conv, normalise_items("a", 999))
    await store.append_items("t", conv["id"], normalise_items([{"role": "user", "content": "b"}] * 4, 999))
    await store.begin_conversation("t", conv["id"], "A")
    with pytest.raises(InvalidRequest):  # 5 + input + output > 6: neither the items nor the response land
        await _save(store, "t", "c", conversation=conv["id"], token="A")
    items, _ = await store.list_items("t", conv["id"], after=None, limit=100, order="asc")
    assert len(items) == 5
    assert not [k async for k in store._client().scan_iter(match="gravity:*:resp:*")]


async def test_deleting_a_conversation_removes_every_key(store: StateStore) -> None:
    conv = {"id": f"conv_{new_hex()}", "object": "conversation", "created_at": 0, "metadata": {}}
    await store.create_conversation("t", conv, normalise_items("x", 999))
    await store.delete_conversation("t", conv["id"])
    assert not [k async for k in store._client().scan_iter(match=f"*{conv['id']}*")]
    with pytest.raises(NotFound):
        await store.delete_conversation("t", conv["id"])
