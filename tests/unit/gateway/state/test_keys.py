from __future__ import annotations

from redis.cluster import key_slot

import gateway.state
from gateway.state.keys import ConversationKeys, ResponseKeys, parse_response_id, response_id, session_key


def test_public_api() -> None:
    assert sorted(gateway.state.__all__) == ["Client", "SessionAffinity", "StateStore"]


def test_a_thread_and_its_conversation_share_one_slot() -> None:
    ck = ConversationKeys("acme", "conv_" + "a" * 32)
    keys = [ck.meta, ck.order, ck.items, ck.lock, ck.responses().response(response_id("b" * 32, "a" * 32))]
    assert len({key_slot(k.encode()) for k in keys}) == 1
    assert all(k.startswith("gravity:{acme/" + "a" * 32 + "}") for k in keys)


def test_ids_carry_their_thread() -> None:
    root = response_id("c" * 32, "c" * 32)
    assert root == "resp_" + "c" * 32 and parse_response_id(root) == ("c" * 32, "c" * 32)
    child = response_id("d" * 32, "c" * 32)
    assert parse_response_id(child) == ("d" * 32, "c" * 32)
    assert parse_response_id("resp_{x}") is None and parse_response_id("resp_" + "C" * 32) is None
    assert ResponseKeys("t", "c" * 32).response(child).startswith(ResponseKeys("t", "c" * 32).prefix)


def test_tenants_and_sessions_cannot_inject_a_hash_tag() -> None:
    key = session_key("a}b{", "x}{y")
    assert key.count("{") == 1 and key.count("}") == 1
    assert ConversationKeys("t/1", "conv_" + "a" * 32).meta != ConversationKeys("t", "conv_" + "a" * 32).meta
