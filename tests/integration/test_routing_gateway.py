"""Routing end to end: real simulators, a real redis-server and the gateway choosing between them.

Prefix affinity must reuse a backend's cache, in-flight accounting must spread a burst, and
``GET /admin/backends`` must show what the scheduler sees.
"""
from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.support.procs import Proc, start_gateway, start_redis, start_sim

MODEL = "sim-llama"
WORDS = ["gravity", "routing", "cache", "prefix", "replica", "token", "queue", "latency", "engine", "batch"]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("routing")
    redis = start_redis(tmp)
    sims = [start_sim(tmp, MODEL, ["--profile", "tiny"]) for _ in range(3)]
    procs: list[Proc] = [redis, *sims]
    try:
        gw = start_gateway(tmp, {
            "server": {"debug_headers": True},
            "state": {"redis_url": f"redis://127.0.0.1:{redis.port}/0"},
            "backends": [{"name": f"sim-{i}", "url": f"http://127.0.0.1:{s.port}", "models": [MODEL]}
                         for i, s in enumerate(sims)],
        })
        procs.append(gw)
        yield f"http://127.0.0.1:{gw.port}"
    finally:
        for p in reversed(procs):
            p.stop()


async def _chat(session: aiohttp.ClientSession, base: str, messages: list[dict[str, str]],
                max_tokens: int = 4) -> tuple[str, dict[str, Any]]:
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "ignore_eos": True}
    async with session.post(f"{base}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return resp.headers["x-gravity-backend"], (await resp.json())["usage"]


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n))


def test_shared_system_prompt_sticks_to_one_backend_and_hits_its_cache(gateway: str) -> None:
    system = "You are a routing expert. " + _text(random.Random(1), 900)

    async def go() -> list[tuple[str, dict[str, Any]]]:
        async with aiohttp.ClientSession() as s:
            return [await _chat(s, gateway, [{"role": "system", "content": system},
                                              {"role": "user", "content": f"question {i}?"}]) for i in range(6)]

    results = asyncio.run(go())
    backends = {b for b, _ in results}
    assert len(backends) == 1, [b for b, _ in results]
    cached = [u.get("prompt_tokens_details", {}).get("cached_tokens", 0) for _, u in results]
    assert cached[0] == 0
    # Most of the ~900-token system prompt is reused from the first request's KV cache.
    assert all(c > 0.8 * results[0][1]["prompt_tokens"] for c in cached[1:]), cached


def test_burst_of_different_prompts_spreads_and_admin_shows_inflight(gateway: str) -> None:
    rng = random.Random(2)
    prompts = [f"{i} " + _text(rng, 300) for i in range(12)]

    async def go() -> tuple[list[str], dict[str, Any]]:
        async with aiohttp.ClientSession() as s:
            tasks = [asyncio.create_task(_chat(s, gateway, [{"role": "user", "content": p}], max_tokens=48))
                     for p in prompts]
            await asyncio.sleep(0.1)  # requests in flight (48 tokens at >= 5 ms a step)
            async with s.get(f"{gateway}/admin/backends") as resp:
                during = await resp.json()
            done = await asyncio.gather(*tasks)
            return [b for b, _ in done], during

    landed, during = asyncio.run(go())
    counts = Counter(landed)
    # Without in-flight accounting every request would go to the replica that looked idlest at the
    # last scrape; with it, the burst spreads over all three.
    assert len(counts) == 3 and max(counts.values()) <= 6, counts
    assert sum(e["inflight"]["requests"] for e in during.values()) > 0, during


def test_admin_backends_reports_metrics_and_settles(gateway: str) -> None:
    async def go() -> dict[str, Any]:
        async with aiohttp.ClientSession() as s, s.get(f"{gateway}/admin/backends") as resp:
            assert resp.status == 200
            return await resp.json()  # type: ignore[no-any-return]

    state = asyncio.run(go())
    assert set(state) == {"sim-0", "sim-1", "sim-2"}
    for entry in state.values():
        assert entry["healthy"] and entry["fresh"], entry
        m = entry["metrics"]
        assert m is not None and m["kv_capacity_tokens"] == 256 * 16 and m["age_s"] < 2.0
        # Everything earlier has finished, so nothing is left in flight.
        assert entry["inflight"] == {"requests": 0, "prompt_tokens": 0, "decode_tokens": 0,
                                     "other_replicas": {"requests": 0, "prompt_tokens": 0}}
