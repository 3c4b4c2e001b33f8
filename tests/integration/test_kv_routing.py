"""Precise routing end to end: simulators publishing KV events, the gateway subscribed to them."""
from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.support.kv import precise_routing, start_kv_sim
from tests.support.procs import Proc, start_gateway, start_redis

MODEL = "sim-llama"
WORDS = ["gravity", "routing", "cache", "prefix", "replica", "token", "queue", "latency", "engine", "batch"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[Proc]]]:
    tmp = tmp_path_factory.mktemp("kvrouting")
    procs: list[Proc] = [start_redis(tmp)]
    try:
        backends = []
        sims = []
        for i in range(3):
            sim, entry = start_kv_sim(tmp)
            procs.append(sim)
            sims.append(sim)
            backends.append({"name": f"sim-{i}", "url": f"http://127.0.0.1:{sim.port}", "models": [MODEL],
                             "kv_events": entry})
        gw = start_gateway(tmp, {"server": {"debug_headers": True}, "backends": backends,
                                 "routing": precise_routing(),
                                 "state": {"redis_url": f"redis://127.0.0.1:{procs[0].port}/0"}})
        procs.append(gw)
        yield f"http://127.0.0.1:{gw.port}", sims
    finally:
        for p in reversed(procs):
            p.stop()


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n))


async def _chat(s: aiohttp.ClientSession, base: str, system: str, q: str) -> tuple[str, int]:
    body = {"model": MODEL, "messages": [{"role": "system", "content": system}, {"role": "user", "content": q}],
            "max_tokens": 2, "ignore_eos": True}
    async with s.post(f"{base}/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        usage = (await r.json())["usage"]
        return r.headers["x-gravity-backend"], usage["prompt_tokens_details"]["cached_tokens"]


async def _kv(s: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with s.get(f"{base}/admin/kv-events") as r:
        assert r.status == 200
        data: dict[str, Any] = await r.json()
        return data


async def _until_held(s: aiohttp.ClientSession, base: str, name: str, at_least: int) -> dict[str, Any]:
    for _ in range(100):
        kv = await _kv(s, base)
        if kv["endpoints"][name]["blocks_held"] >= at_least:
            return kv
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} never reported {at_least} blocks: {kv}")


async def test_the_index_learns_from_events_and_routes_to_the_holder(fleet: tuple[str, list[Proc]]) -> None:
    base, _ = fleet
    rng = random.Random(1)
    system = "You answer about routing. " + _text(rng, 700)
    async with aiohttp.ClientSession() as s:
        first, cached = await _chat(s, base, system, "first?")
        assert cached == 0
        kv = await _until_held(s, base, first, 40)
        assert kv["mode"] == "tokens" and kv["endpoints"][first]["batches"] > 0
        # The pick is what the engines report, not a guess: a dry-run names the holder.
        body = {"model": MODEL, "messages": [{"role": "system", "content": system}, {"role": "user", "content": "x"}]}
        async with s.post(f"{base}/admin/route", json=body) as r:
            route = await r.json()
        assert route["backend"] == first and route["ranked"][0]["scores"]["prefix"] > 0.8
        for i in range(4):
            backend, cached = await _chat(s, base, system, f"question {i}?")
            assert backend == first and cached > 600


async def test_an_engine_restart_empties_its_entry(fleet: tuple[str, list[Proc]]) -> None:
    base, sims = fleet
    rng = random.Random(2)
    system = "Restart drill. " + _text(rng, 500)
    async with aiohttp.ClientSession() as s:
        first, _ = await _chat(s, base, system, "hello?")
        await _until_held(s, base, first, 20)
        sim = sims[int(first.split("-")[1])]
        async with s.post(f"http://127.0.0.1:{sim.port}/admin/reset") as r:
            assert r.status == 200
        # The next batch from the new engine numbers from 0: the gateway drops what it believed.
        other = "Unrelated warm-up. " + _text(rng, 100)
        for _ in range(30):
            await _chat(s, base, other, "ping")
            kv = await _kv(s, base)
            if kv["endpoints"][first]["restarts"] >= 1:
                break
        else:
            raise AssertionError(f"restart never seen: {kv}")
        async with s.post(f"{base}/admin/route", json={"model": MODEL, "messages": [
                {"role": "system", "content": system}, {"role": "user", "content": "x"}]}) as r:
            route = await r.json()
        assert all(c["scores"].get("prefix", 0.0) < 0.5 for c in route["ranked"]), route


async def test_dry_run_rejects_bad_input_openai_shaped(fleet: tuple[str, list[Proc]]) -> None:
    base, _ = fleet
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}/admin/route?path=nope", json={"model": MODEL}) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "path"
        async with s.post(f"{base}/admin/route", data=b"{") as r:
            assert r.status == 400 and "error" in await r.json()
