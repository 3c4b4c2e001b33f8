"""`metrics.key_label`: the API key's name as a bounded label on the token and per-key request counters,
never the key itself (real gateway, simulator and redis-server, the openai SDK as client)."""
from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from policies.keys import hash_key
from tests.support.procs import Proc, start_gateway, start_redis, start_sim

pytestmark = pytest.mark.slow

MODEL = "sim-llama"
CAP = 3
SECRETS = [f"sk-key-label-secret-{i}" for i in range(6)]


def _metrics(port: int) -> str:
    async def go() -> str:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
            assert r.status == 200
            return await r.text()
    return asyncio.run(go())


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    tmp: Path = tmp_path_factory.mktemp("key-label")
    redis = start_redis(tmp)
    sim = start_sim(tmp, MODEL, ["--profile", "tiny"])
    keys = [{"name": f"app-{i}", "sha256": hash_key(s), "tenant": "team-a" if i % 2 else "team-b"}
            for i, s in enumerate(SECRETS)]
    gw = start_gateway(tmp, {
        "state": {"redis_url": f"redis://127.0.0.1:{redis.port}/0"},
        "backends": [{"name": "sim-0", "url": f"http://127.0.0.1:{sim.port}", "models": [MODEL]}],
        "policies": {"auth": {"enabled": True, "keys": keys}},
        "metrics": {"key_label": True, "key_label_max": CAP},
    })
    try:
        yield gw
    finally:
        for p in (gw, sim, redis):
            p.stop()


def test_key_names_label_tokens_and_requests_up_to_the_cap_and_no_secret_is_shown(gateway: Proc) -> None:
    for secret in SECRETS:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key=secret, max_retries=0)
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "key label"}],
                                       max_tokens=3)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key="sk-not-a-key",
                      max_retries=0).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    text = _metrics(gateway.port)
    requests: dict[str, float] = {}
    token_keys: set[str] = set()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "gravity_key_requests_total":
                requests[s.labels["key"]] = requests.get(s.labels["key"], 0) + s.value
            elif s.name == "gravity_tokens_total":
                token_keys.add(s.labels["key"])
    # The first CAP names seen have their own label (the requests came one after another), the rest share `other`.
    assert requests == {**{f"app-{i}": 1 for i in range(CAP)}, "other": len(SECRETS) - CAP, "_none": 1}
    assert token_keys == {f"app-{i}" for i in range(CAP)} | {"other"}
    for secret in [*SECRETS, "sk-not-a-key"]:
        assert secret not in text
        assert hash_key(secret) not in text
