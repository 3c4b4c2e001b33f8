"""Which profile and which replicas a request gets, through a real gateway in front of real simulators.

A request naming a LoRA adapter routes as its base model with the adapter set (so `profile_rules`
with `lora: true`, the lora-capable filter and lora affinity apply) and lands only on replicas started
with `--lora-modules` for it. Profiles are chosen by config rules (model glob, priority) and by the
`x-gravity-profile` header, which only keys whose `profiles:` list names the profile may use.
"""
from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import redis.asyncio as aioredis

from policies.keys import RedisKeyStore, hash_key
from tests.support.procs import Proc, start_gateway, start_redis, start_sim

MODEL = "sim-llama"
ADAPTER = "sql"
BIG = "sim-big"  # a second name sim-2 serves
DEFAULT_REFS = [{"ref": "prefix", "weight": 2.0}, {"ref": "prefill-cost", "weight": 4.0},
                {"ref": "load-guard", "weight": 2.0}, {"ref": "session", "weight": 1.0},
                {"ref": "lora", "weight": 1.0}]
ROUTING = {
    "plugins": [{"type": "prefix-cache-scorer", "name": "prefix"},
                {"type": "prefill-cost-scorer", "name": "prefill-cost"},
                {"type": "load-guard-scorer", "name": "load-guard"},
                {"type": "session-affinity-scorer", "name": "session"},
                {"type": "lora-affinity-scorer", "name": "lora"}],
    "profiles": [{"name": "default", "plugins": DEFAULT_REFS},
                 {"name": "round-robin", "picker": "round-robin"},
                 {"name": "big", "plugins": [{"ref": "least-request-scorer"}]},
                 {"name": "adapters", "plugins": [{"ref": "lora"}, {"ref": "least-request-scorer"}]},
                 {"name": "urgent", "plugins": [{"ref": "least-request-scorer"}]}],
    "profile_rules": [{"model": BIG, "profile": "big"},  # by model
                      {"lora": True, "profile": "adapters"},  # requests that name an adapter
                      {"priority": "critical", "profile": "urgent"}],
}
KEYS = [
    {"name": "plain", "sha256": hash_key("key-plain"), "max_priority": "critical"},
    {"name": "tuner", "sha256": hash_key("key-tuner"), "profiles": ["round-robin"]},
    {"name": "ops", "sha256": hash_key("key-ops"), "admin": True},
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("profiles")
    redis = start_redis(tmp)
    procs: list[Proc] = [redis]
    try:
        # sim-0 and sim-1 serve the adapter, sim-2 the base model under two names; models are discovered
        # from /v1/models.
        extra = [["--lora-modules", f"{ADAPTER}=/adapters/sql"]] * 2 + [["--served-model-name", MODEL, BIG]]
        sims = [start_sim(tmp, MODEL, ["--profile", "tiny", *e]) for e in extra]
        procs += sims
        gw = start_gateway(tmp, {
            "server": {"debug_headers": True},
            "state": {"redis_url": f"redis://127.0.0.1:{redis.port}/0"},
            "backends": [{"name": f"sim-{i}", "url": f"http://127.0.0.1:{s.port}"} for i, s in enumerate(sims)],
            "routing": ROUTING,
            "policies": {"auth": {"enabled": True, "keys": KEYS}},
        })
        procs.append(gw)
        stack = {"gateway": gw, "sims": sims, "redis": redis}
        _wait_for_discovery(stack)
        yield stack
    finally:
        for p in reversed(procs):
            p.stop()


def _client(stack: dict[str, Any], key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{stack['gateway'].port}/v1", api_key=key, max_retries=0,
                         timeout=15)


def _chat(api: openai.OpenAI, model: str, text: str, headers: dict[str, str] | None = None) -> tuple[str, str]:
    """(backend, profile) that served one request, from the gateway's debug headers."""
    raw = api.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": text}], max_tokens=2, extra_headers=headers or {})
    route = raw.headers["x-gravity-route"]
    assert raw.parse().model == model
    return raw.headers["x-gravity-backend"], route.split()[0].removeprefix("profile=")


def _records(sim: Proc) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{sim.port}/admin/requests", timeout=10) as resp:
        return list(json.loads(resp.read())["requests"])


def _wait_for_discovery(stack: dict[str, Any]) -> None:
    """The gateway reads each replica's /v1/models on its first scrapes."""
    deadline = time.monotonic() + 15
    while True:
        with urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{stack['gateway'].port}/admin/backends",
                headers={"authorization": "Bearer key-ops"}), timeout=10) as resp:
            state = json.loads(resp.read())
        found = [(sorted(state[f"sim-{i}"]["loras"]), state[f"sim-{i}"]["fresh"]) for i in range(3)]
        if found == [([ADAPTER], True), ([ADAPTER], True), ([], True)] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert found == [([ADAPTER], True), ([ADAPTER], True), ([], True)], state


def test_adapter_requests_land_only_where_the_adapter_is_served(stack: dict[str, Any]) -> None:
    api = _client(stack, "key-plain")
    adapter = [_chat(api, ADAPTER, f"select {i} from t where the rows are many {i}") for i in range(12)]
    # The lora rule ran (the request routed with the adapter set), on both replicas that have it...
    assert {p for _, p in adapter} == {"adapters"}
    assert {b for b, _ in adapter} == {"sim-0", "sim-1"}, Counter(b for b, _ in adapter)
    # ...and the engines were asked for the adapter itself, never the base model in its place.
    seen = [r["model"] for sim in stack["sims"][:2] for r in _records(sim)]
    assert seen.count(ADAPTER) == 12
    assert not any(r["model"] == ADAPTER for r in _records(stack["sims"][2]))
    # Base-model requests still use every replica.
    base = [_chat(api, MODEL, f"question {i}: " + "words " * (20 + 7 * i)) for i in range(18)]
    assert {p for _, p in base} == {"default"}
    assert {b for b, _ in base} == {"sim-0", "sim-1", "sim-2"}, Counter(b for b, _ in base)


def test_profile_by_model_by_config_rule_and_default(stack: dict[str, Any]) -> None:
    api = _client(stack, "key-plain")
    assert _chat(api, MODEL, "hello there")[1] == "default"
    assert _chat(api, BIG, "hello there") == ("sim-2", "big")
    assert _chat(api, MODEL, "hello there", {"x-gravity-priority": "critical"})[1] == "urgent"


def test_header_profile_only_for_keys_that_list_it(stack: dict[str, Any]) -> None:
    tuner = _client(stack, "key-tuner")
    picks = [_chat(tuner, MODEL, "same prompt every time", {"x-gravity-profile": "round-robin"}) for _ in range(6)]
    assert {p for _, p in picks} == {"round-robin"}
    # Round robin really ran: the same prompt, which the default would keep on one replica, rotates.
    assert {b for b, _ in picks} == {"sim-0", "sim-1", "sim-2"}
    # The header beats the rules: an adapter request asked to run round robin does.
    assert _chat(tuner, ADAPTER, "select 1", {"x-gravity-profile": "round-robin"})[1] == "round-robin"

    before = sum(len(_records(s)) for s in stack["sims"])
    for key, profile in (("key-plain", "round-robin"), ("key-tuner", "urgent"), ("key-tuner", "nope")):
        with pytest.raises(openai.PermissionDeniedError) as info:
            _chat(_client(stack, key), MODEL, "x", {"x-gravity-profile": profile})
        err = info.value.body
        assert isinstance(err, dict) and err["code"] == "profile_not_allowed", err
        assert err["param"] == "x-gravity-profile" and profile in err["message"]
    # Refused before dispatch: no replica saw any of them.
    assert sum(len(_records(s)) for s in stack["sims"]) == before


def test_a_stored_key_naming_a_profile_not_configured_gets_a_400(stack: dict[str, Any]) -> None:
    async def create() -> str:
        client = aioredis.Redis(port=stack["redis"].port)
        try:
            text, _ = await RedisKeyStore(client).create(name="stale", tenant="default",
                                                         profiles=["retired", "round-robin"])
        finally:
            await client.aclose()
        return text

    api = _client(stack, asyncio.run(create()))
    with pytest.raises(openai.BadRequestError) as info:
        _chat(api, MODEL, "x", {"x-gravity-profile": "retired"})
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "unknown_profile"
    assert _chat(api, MODEL, "x", {"x-gravity-profile": "round-robin"})[1] == "round-robin"


def test_dry_run_shows_the_profile_a_rule_selects(stack: dict[str, Any]) -> None:
    body = json.dumps({"model": ADAPTER, "messages": [{"role": "user", "content": "select 2"}]}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{stack['gateway'].port}/admin/route", data=body,
                                 headers={"authorization": "Bearer key-ops", "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        out = json.loads(resp.read())
    assert out["profile"] == "adapters" and out["backend"] in {"sim-0", "sim-1"}, out
    assert {c["endpoint"] for c in out["ranked"]} == {"sim-0", "sim-1"}
    # An admin may dry-run any profile.
    req.add_header("x-gravity-profile", "round-robin")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert json.loads(resp.read())["profile"] == "round-robin"

