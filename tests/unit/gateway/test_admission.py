"""gateway/admission.py: how the policies sit on an Exchange (no network: Redis is left unattached)."""
from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.config import parse_config
from gateway.core import Core, build_core
from gateway.exchange import Exchange
from gateway.openai_requests import parse_body
from policies.errors import RateLimited
from policies.keys import hash_key


def _gateway(policies: dict[str, Any], **server: Any) -> Core:
    cfg = parse_config({"server": server, "policies": policies,
                        "backends": [{"name": "b", "url": "http://127.0.0.1:9", "models": ["m"]}]})
    return build_core(cfg)


def _exchange(gw: Core, body: dict[str, Any], route: str = "chat/completions") -> Exchange:
    raw = orjson.dumps(body)
    return gw.pipeline.exchange(route, parse_body(route, raw), raw, {}, "rid", {})


async def _admit(gw: Core, ex: Exchange, headers: dict[str, str]) -> None:
    key = await gw.pipeline.authenticate(ex, headers)
    await gw.pipeline.reserve(ex, key)


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 7}


async def test_priority_reaches_the_upstream_body_and_raw_bytes() -> None:
    gw = _gateway({"priority": {"upstream": True}})
    ex = _exchange(gw, CHAT)
    await _admit(gw, ex, {"x-gravity-priority": "critical"})
    assert ex.routing.priority == "critical"
    assert orjson.loads(ex.upstream_body())["priority"] == -10
    assert orjson.loads(ex.raw) == {**CHAT, "priority": -10}


async def test_without_upstream_priority_the_body_is_untouched() -> None:
    gw = _gateway({})
    ex = _exchange(gw, CHAT)
    raw = ex.raw
    await _admit(gw, ex, {"x-gravity-priority": "sheddable"})
    assert ex.raw is raw and ex.routing.priority == "sheddable"


KEYS = [{"name": "std", "sha256": hash_key("std")},
        {"name": "boss", "sha256": hash_key("boss"), "max_priority": "critical"}]


@pytest.mark.parametrize(("key", "header", "want", "value"), [
    ("std", "critical", "standard", 0), ("boss", "critical", "critical", -10), ("std", "sheddable", "sheddable", 10),
])
async def test_the_header_is_capped_at_the_keys_max_priority(key: str, header: str, want: str, value: int) -> None:
    gw = _gateway({"auth": {"enabled": True, "keys": KEYS}, "priority": {"upstream": True}})
    ex = _exchange(gw, {**CHAT, "priority": -1000})
    await _admit(gw, ex, {"authorization": f"Bearer {key}", "x-gravity-priority": header})
    assert ex.routing.priority == want
    assert orjson.loads(ex.raw)["priority"] == value and orjson.loads(ex.upstream_body())["priority"] == value


@pytest.mark.parametrize("stream", [False, True])
async def test_a_clients_own_body_priority_is_stripped_without_upstream_priority(stream: bool) -> None:
    gw = _gateway({"auth": {"enabled": True, "keys": KEYS}})
    ex = _exchange(gw, {**CHAT, "priority": -1000, "stream": stream})
    await _admit(gw, ex, {"authorization": "Bearer std"})
    assert "priority" not in orjson.loads(ex.raw) and "priority" not in orjson.loads(ex.upstream_body())
    assert "priority" not in ex.body


async def test_no_token_counting_when_no_limit_applies() -> None:
    """Nothing to reserve: the estimator is not asked, routing keeps its bytes/4 estimate."""
    gw = _gateway({})
    admission = gw.admission
    calls: list[bytes] = []
    admission.estimator.estimate = lambda model, prompt, messages=0: calls.append(prompt)  # type: ignore[attr-defined]
    ex = _exchange(gw, CHAT)
    before = ex.routing.prompt_tokens
    await _admit(gw, ex, {})
    assert calls == [] and ex.routing.prompt_tokens == before and "admission" not in ex.extras


async def test_reserve_settle_refund_through_the_hooks() -> None:
    """Redis never attached: the local limiter answers, which is the fail-open path."""
    gw = _gateway({"auth": {"enabled": True, "keys": [{"name": "k", "sha256": hash_key("s"), "limits": {"tpm": 100}}]},
                   "rate_limits": {"default_max_tokens": 50}}, debug_headers=True)
    headers = {"authorization": "Bearer s"}
    first = _exchange(gw, {**CHAT, "max_tokens": None})
    await _admit(gw, first, headers)
    reserved = int(first.response_headers["x-gravity-reserved-tokens"])
    assert reserved == first.routing.prompt_tokens + 50
    assert first.response_headers["x-ratelimit-remaining-tokens"] == str(100 - reserved)
    second = _exchange(gw, {**CHAT, "max_tokens": None})
    with pytest.raises(RateLimited):
        await _admit(gw, second, headers)
    first.outcome = "client_disconnect"  # cancelled: everything back
    await gw.pipeline.finish(first)
    third = _exchange(gw, CHAT)
    await _admit(gw, third, headers)
    third.outcome, third.usage = "ok", {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    await gw.pipeline.finish(third)
    fourth = _exchange(gw, {**CHAT, "max_tokens": 1})
    await _admit(gw, fourth, headers)
    # 100 - 12 used - this reservation, give or take a token of refill.
    left = int(fourth.response_headers["x-ratelimit-remaining-tokens"])
    assert abs(left - (100 - 12 - int(fourth.response_headers["x-gravity-reserved-tokens"]))) <= 1


async def test_embeddings_reserve_no_completion_and_n_multiplies_it() -> None:
    gw = _gateway({"tenants": {"default": {"limits": {"tpm": 10_000}}}}, debug_headers=True)
    emb = _exchange(gw, {"model": "m", "input": "abc"}, "embeddings")
    await _admit(gw, emb, {})
    assert int(emb.response_headers["x-gravity-reserved-tokens"]) == emb.routing.prompt_tokens
    many = _exchange(gw, {**CHAT, "n": 3})
    await _admit(gw, many, {})
    assert int(many.response_headers["x-gravity-reserved-tokens"]) == many.routing.prompt_tokens + 21
