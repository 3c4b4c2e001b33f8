"""Admission as a client sees it: API keys (config and `gravity keys`), OpenAI-shaped refusals the
openai SDK understands, priority shedding and the priority passed to a vLLM-like backend."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from policies.keys import hash_key
from tests.support.procs import REPO, Proc, start_gateway, start_redis, start_sim

MODEL = "sim-llama"
MSGS = [{"role": "user", "content": "Tell me about admission control."}]


class Stack:
    def __init__(self, gateway: Proc, redis: Proc) -> None:
        self.gateway, self.redis = gateway, redis
        self.base = f"http://127.0.0.1:{gateway.port}"
        self.redis_url = f"redis://127.0.0.1:{redis.port}/0"

    def client(self, key: str, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, **{"max_retries": 0, **kw})


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp: Path = tmp_path_factory.mktemp("admission")
    redis = start_redis(tmp)
    sim = start_sim(tmp, MODEL, ["--profile", "tiny", "--scheduling-policy", "priority"])
    keys = [
        {"name": "ci", "sha256": hash_key("key-ci"), "tenant": "team-a", "models": [MODEL]},
        {"name": "slow", "sha256": hash_key("key-slow"), "tenant": "team-b", "limits": {"rpm": 60}},
        {"name": "elsewhere", "sha256": hash_key("key-elsewhere"), "tenant": "team-a", "models": ["other"]},
        {"name": "batch", "sha256": hash_key("key-batch"), "tenant": "team-c", "priority": "sheddable"},
        {"name": "batch-up", "sha256": hash_key("key-batch-up"), "tenant": "team-c", "priority": "sheddable",
         "max_priority": "standard"},
        {"name": "ops", "sha256": hash_key("key-ops"), "tenant": "ops", "admin": True},
    ]
    cfg = {
        "state": {"redis_url": f"redis://127.0.0.1:{redis.port}/0"},
        "backends": [{"name": "sim", "url": f"http://127.0.0.1:{sim.port}", "models": [MODEL]}],
        "policies": {
            "auth": {"enabled": True, "keys": keys, "cache_ttl_s": 0.3},
            "tenants": {"team-a": {"limits": {"tpm": 1_000_000}}},
            "priority": {"upstream": True, "shed_inflight_threshold": 2},
        },
    }
    gw = start_gateway(tmp, cfg)
    try:
        yield Stack(gw, redis)
    finally:
        for p in (gw, sim, redis):
            p.stop()


def _keys(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "keys", *args], capture_output=True, text=True, check=False,
                          cwd=REPO, timeout=30)


def test_missing_or_wrong_key_is_401(stack: Stack) -> None:
    with pytest.raises(openai.AuthenticationError) as err:
        stack.client("key-wrong").chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2)
    assert err.value.code == "invalid_api_key"

    async def anonymous() -> tuple[int, Any]:
        async with aiohttp.ClientSession() as s, s.post(
                stack.base + "/v1/chat/completions", data=orjson.dumps({"model": MODEL, "messages": MSGS}),
                headers={"content-type": "application/json"}) as r:
            return r.status, orjson.loads(await r.read())

    status, body = asyncio.run(anonymous())
    assert status == 401
    assert body["error"]["code"] == "invalid_api_key" and body["error"]["type"] == "invalid_request_error"
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_config_key_with_tenant_limits_gets_ratelimit_headers(stack: Stack) -> None:
    raw = stack.client("key-ci").chat.completions.with_raw_response.create(model=MODEL, messages=MSGS, max_tokens=2)
    assert raw.parse().choices
    assert raw.headers["x-ratelimit-limit-tokens"] == "1000000"
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 1_000_000
    assert raw.headers["x-ratelimit-reset-tokens"].endswith(("ms", "s"))


def test_a_model_the_key_may_not_use_is_403(stack: Stack) -> None:
    with pytest.raises(openai.PermissionDeniedError) as err:
        stack.client("key-elsewhere").chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2)
    assert err.value.code == "model_not_allowed"


def test_the_sdk_sees_rate_limit_error_with_headers_and_its_retries_work(stack: Stack) -> None:
    client = stack.client("key-slow")
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MSGS, max_tokens=2)
    assert raw.headers["x-ratelimit-limit-requests"] == "60"
    assert raw.headers["x-ratelimit-remaining-requests"] == "59"
    async def burst() -> list[BaseException | None]:
        # All at once: one by one, a loaded machine can serve them slower than the bucket refills (1/s).
        aclient = openai.AsyncOpenAI(base_url=client.base_url, api_key=client.api_key, max_retries=0)

        async def one() -> BaseException | None:
            try:
                await aclient.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=1)  # type: ignore[arg-type]
            except openai.RateLimitError as exc:
                return exc
            return None
        try:
            return await asyncio.gather(*(one() for _ in range(70)))
        finally:
            await aclient.close()

    refused = [e for e in asyncio.run(burst()) if isinstance(e, openai.RateLimitError)]
    if not refused:
        pytest.fail("never rate limited")
    err = refused[0]
    assert err.code == "rate_limit_exceeded" and err.type == "requests"
    h = err.response.headers
    assert h["x-ratelimit-limit-requests"] == "60" and h["x-ratelimit-remaining-requests"] == "0"
    assert int(h["retry-after"]) >= 1 and 0 < int(h["retry-after-ms"]) <= 1000
    assert "x-request-id" in h
    # The SDK's own retry honours retry-after-ms: one request per second comes back.
    start = time.monotonic()
    patient = stack.client("key-slow", max_retries=3)
    assert patient.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=1).choices
    assert time.monotonic() - start < 5


def test_keys_cli_create_list_revoke(stack: Stack) -> None:
    created = _keys(stack, "create", "--redis-url", stack.redis_url, "--name", "bot", "--tenant", "team-d",
                    "--model", MODEL, "--rpm", "100", "--json")
    assert created.returncode == 0, created.stderr
    record = orjson.loads(created.stdout)
    key = record["key"]
    assert key.startswith("gk-") and record["id"] == hash_key(key)[:12]
    assert stack.client(key).chat.completions.create(model=MODEL, messages=MSGS, max_tokens=1).choices

    listed = _keys(stack, "list", "--redis-url", stack.redis_url)
    assert record["id"] in listed.stdout and "tenant=team-d" in listed.stdout and key not in listed.stdout
    assert _keys(stack, "hash", key).stdout.strip() == hash_key(key)

    revoked = _keys(stack, "revoke", "--redis-url", stack.redis_url, record["id"])
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    time.sleep(0.4)  # the gateway trusts a key it read for cache_ttl_s
    with pytest.raises(openai.AuthenticationError):
        stack.client(key).chat.completions.create(model=MODEL, messages=MSGS, max_tokens=1)
    assert _keys(stack, "revoke", "--redis-url", stack.redis_url, record["id"]).returncode == 1


async def test_sheddable_requests_are_refused_when_every_endpoint_is_saturated(stack: Stack) -> None:
    url = stack.base + "/v1/chat/completions"

    def body(max_tokens: int, stream: bool = False) -> bytes:
        return orjson.dumps({"model": MODEL, "messages": MSGS, "max_tokens": max_tokens, "stream": stream,
                             "ignore_eos": True})

    async def post(s: aiohttp.ClientSession, key: str, priority: str | None = None) -> tuple[int, Any, Any]:
        headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        if priority:
            headers["x-gravity-priority"] = priority
        async with s.post(url, data=body(1), headers=headers) as r:
            return r.status, r.headers, orjson.loads(await r.read())

    async with aiohttp.ClientSession() as s:
        # Not saturated: the priority reaches the backend (vLLM's priority scheduler accepts it).
        assert (await post(s, "key-batch"))[0] == 200
        assert (await post(s, "key-ci", "critical"))[0] == 200
        assert (await post(s, "key-ci", "urgent"))[2]["error"]["code"] == "invalid_priority"
        # Two long streams fill the only endpoint (shed_inflight_threshold: 2).
        held = [await s.post(url, data=body(2000, stream=True),
                             headers={"authorization": "Bearer key-ci", "content-type": "application/json"})
                for _ in range(2)]
        try:
            for r in held:
                assert r.status == 200
                await r.content.readany()
            status, headers, err = await post(s, "key-batch")  # sheddable by the key's default
            assert status == 429 and err["error"]["code"] == "load_shed" and headers["retry-after"] == "1"
            status, _, err = await post(s, "key-ci", "sheddable")
            assert status == 429
            assert (await post(s, "key-ci", "critical"))[0] == 200  # never shed by the gateway
            # A sheddable key cannot promote itself out of shedding unless its max_priority allows.
            assert (await post(s, "key-batch", "standard"))[0] == 429
            assert (await post(s, "key-batch-up", "standard"))[0] == 200
        finally:
            for r in held:
                r.close()
        await asyncio.sleep(0.2)
        assert (await post(s, "key-batch"))[0] == 200
        async with s.get(stack.base + "/metrics") as r:
            text = await r.text()
        assert 'gravity_admission_rejections_total{code="load_shed"} 3.0' in text


def test_admin_backends_needs_an_admin_key_once_auth_is_on(stack: Stack) -> None:
    async def get(headers: dict[str, str]) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as s, s.get(stack.base + "/admin/backends", headers=headers) as r:
            return r.status, orjson.loads(await r.read())

    status, body = asyncio.run(get({}))
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    # A tenant's valid key is not an operator's: backend URLs and load are not its business.
    status, body = asyncio.run(get({"authorization": "Bearer key-ci"}))
    assert status == 403 and body["error"]["code"] == "admin_required"
    status, body = asyncio.run(get({"authorization": "Bearer key-ops"}))
    assert status == 200 and "sim" in body and body["sim"]["circuit"] == "closed"
    # /metrics stays open by default (server.metrics_auth: none) for a scraper on a private network.
    async def metrics() -> int:
        async with aiohttp.ClientSession() as s, s.get(stack.base + "/metrics") as r:
            return r.status
    assert asyncio.run(metrics()) == 200


def test_keys_cli_admin_flag_makes_an_operator_key(stack: Stack) -> None:
    async def backends(key: str) -> int:
        async with aiohttp.ClientSession() as s, s.get(stack.base + "/admin/backends",
                                                      headers={"authorization": f"Bearer {key}"}) as r:
            return r.status

    plain = orjson.loads(_keys(stack, "create", "--redis-url", stack.redis_url, "--name", "t", "--json").stdout)
    made = _keys(stack, "create", "--redis-url", stack.redis_url, "--name", "oncall", "--tenant", "ops",
                 "--admin", "--json")
    assert made.returncode == 0, made.stderr
    admin = orjson.loads(made.stdout)
    assert admin["admin"] is True and plain["admin"] is False
    assert asyncio.run(backends(plain["key"])) == 403
    assert asyncio.run(backends(admin["key"])) == 200
    assert "admin" in _keys(stack, "list", "--redis-url", stack.redis_url).stdout


def test_metrics_can_be_kept_to_admin_keys(tmp_path: Path) -> None:
    redis = start_redis(tmp_path)
    cfg = {"server": {"metrics_auth": "admin"}, "state": {"redis_url": f"redis://127.0.0.1:{redis.port}/0"},
           "backends": [{"name": "sim", "url": "http://127.0.0.1:1", "models": [MODEL]}],
           "policies": {"auth": {"enabled": True, "keys": [
               {"name": "t", "sha256": hash_key("key-t"), "tenant": "t"},
               {"name": "prometheus", "sha256": hash_key("key-prom"), "tenant": "ops", "admin": True}]}}}
    gw = start_gateway(tmp_path, cfg)
    try:
        async def get(headers: dict[str, str]) -> tuple[int, bytes]:
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{gw.port}/metrics",
                                                           headers=headers) as r:
                return r.status, await r.read()
        assert asyncio.run(get({}))[0] == 401
        assert asyncio.run(get({"authorization": "Bearer key-t"}))[0] == 403
        status, body = asyncio.run(get({"authorization": "Bearer key-prom"}))
        assert status == 200 and b"gravity_requests_in_flight" in body
    finally:
        gw.stop()
        redis.stop()
