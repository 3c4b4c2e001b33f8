"""Active-active: three gateway processes on one Redis, subscribed to the same simulators' KV events.

Replicas with the same inputs must make the same pick. The inputs a replica cannot see for itself are
the other replicas' in-flight requests and the blocks they sent that the engine has not reported yet
(pending marks); both are shared through Redis. To judge agreement on the same inputs, and not on who
happened to scrape or hear an event a few milliseconds earlier on a loaded machine, the engines are
frozen: each runs one long request of its own (``--max-num-seqs 1``), so every request the gateways send
queues there, and nothing changes until the test releases them. Each request is sent through the next
gateway in turn; before the next decision the test waits until every gateway's scrape shows exactly
the queue the gateways' own in-flight counts add up to (a quiescent snapshot), then asks all three
(``POST /admin/route``, a dry run) what they would pick. With sharing on they must always agree; with
``shared_inflight: {pending: false}`` (or sharing off) the replica that sent a group's first request is
the only one that knows where the group is queued, and they disagree (docs/kv-events.md).
"""
from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.kv import precise_routing, start_kv_sim
from tests.support.procs import Proc, start_gateway, start_redis

MODEL = "sim-llama"
WORDS = ["gravity", "routing", "cache", "prefix", "replica", "token", "queue", "latency", "engine", "batch"]
GROUPS, REQUESTS = 4, 12
SHARING: dict[str, Any] = {}  # shared_inflight settings; {"pending": False} or {"enabled": False} must fail


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[str], list[Proc]]]:
    tmp: Path = tmp_path_factory.mktemp("active")
    procs: list[Proc] = []
    try:
        redis = start_redis(tmp)
        procs.append(redis)
        # Started side by side, with time to spare: six imports at once on a loaded 2-core host are slow.
        # One running sequence each: the test's own long request holds it, so everything else queues.
        extra = ["--profile", "tiny", "--kv-blocks", "512", "--max-num-seqs", "1", "--time-scale", "0.5"]
        with ThreadPoolExecutor(3) as pool:
            started = list(pool.map(lambda _: start_kv_sim(tmp, extra=extra, timeout=90.0), range(3)))
        sims = [sim for sim, _ in started]
        procs += sims
        backends = [{"name": f"sim-{i}", "url": f"http://127.0.0.1:{sim.port}", "models": [MODEL],
                     "kv_events": entry} for i, (sim, entry) in enumerate(started)]
        routing = {**precise_routing(), "scrape_interval_s": 0.1, "scrape_timeout_s": 2.0, "stale_after_s": 30.0}
        cfg = {"backends": backends, "routing": routing,
               "state": {"redis_url": f"redis://127.0.0.1:{redis.port}/0", "shared_inflight": SHARING}}
        with ThreadPoolExecutor(3) as pool:
            gateways = list(pool.map(lambda _: start_gateway(tmp, cfg, timeout=90.0), range(3)))
        procs += gateways
        yield [f"http://127.0.0.1:{g.port}" for g in gateways], sims
    finally:
        for p in reversed(procs):
            p.stop()


def _workload() -> list[dict[str, Any]]:
    rng = random.Random(7)
    systems = [f"Group {g}. " + " ".join(rng.choices(WORDS, k=rng.randint(250, 400))) for g in range(GROUPS)]
    order = [i % GROUPS for i in range(REQUESTS)]
    rng.shuffle(order)
    return [{"model": MODEL, "max_tokens": 4, "ignore_eos": True, "stream": True,
             "messages": [{"role": "system", "content": systems[g]},
                          {"role": "user", "content": f"q{i} " + " ".join(rng.choices(WORDS, k=12))}]}
            for i, g in enumerate(order)]


async def _hold(s: aiohttp.ClientSession, sim: Proc) -> None:
    """A long request straight to the engine: it holds the engine's one running slot until reset."""
    body = {"model": MODEL, "max_tokens": 4000, "ignore_eos": True, "stream": True,
            "messages": [{"role": "user", "content": "hold"}]}
    async with s.post(f"http://127.0.0.1:{sim.port}/v1/chat/completions", json=body) as r:
        async for _ in r.content:
            pass


async def _quiescent(s: aiohttp.ClientSession, gateways: list[str], sent: int, timeout: float = 20.0) -> dict[str, int]:
    """Wait until every gateway's last scrape shows each engine running its one long request with exactly
    the queue that the gateways' own in-flight counts add up to; returns that queue per backend."""
    deadline = time.monotonic() + timeout
    seen: list[Any] = []
    while time.monotonic() < deadline:
        seen = []
        for g in gateways:
            async with s.get(f"{g}/admin/backends") as r:
                seen.append(await r.json())
        own = {b: sum(st[b]["inflight"]["requests"] for st in seen) for b in seen[0]}
        if sum(own.values()) == sent and all(
                st[b]["metrics"] is not None and st[b]["metrics"]["running"] == 1
                and st[b]["metrics"]["waiting"] == own[b] for st in seen for b in own):
            return own
        await asyncio.sleep(0.05)
    raise AssertionError(f"the gateways never showed one quiescent state: {seen}")


@pytest.mark.timeout(300)  # the call takes ~19 s; starting 7 processes on a loaded host can take 100 s
async def test_replicas_on_the_same_inputs_make_the_same_pick(cluster: tuple[list[str], list[Proc]]) -> None:
    gateways, sims = cluster
    started = time.monotonic()
    disagreements: list[str] = []
    async with aiohttp.ClientSession() as s:
        holders = [asyncio.create_task(_hold(s, sim)) for sim in sims]
        sent: list[asyncio.Task[Any]] = []
        try:
            await _quiescent(s, gateways, 0)
            for i, body in enumerate(_workload()):
                answers = []
                for g in gateways:
                    async with s.post(f"{g}/admin/route", json=body) as r:
                        assert r.status == 200, await r.text()
                        answers.append(await r.json())
                picks = [a["backend"] for a in answers]
                if len(set(picks)) > 1:
                    disagreements.append(f"request {i}: " + "; ".join(
                        " ".join(f"{c['endpoint']}={c['score']:.3f}({c['scores']})" for c in a["ranked"])
                        for a in answers))
                sent.append(asyncio.create_task(s.post(f"{gateways[i % 3]}/v1/chat/completions", json=body)))
                queued = await _quiescent(s, gateways, i + 1)
                print(f"{time.monotonic() - started:.1f}s request {i} {picks} {queued}", flush=True)
            # Sanity: the workload spread over the engines (load terms were in play, not one engine for all).
            assert sum(1 for n in queued.values() if n) >= 2, queued
        finally:
            for sim in sims:  # releases everything: the long requests and the queued ones end as aborted
                async with s.post(f"http://127.0.0.1:{sim.port}/admin/reset") as r:
                    assert r.status == 200
            for t in [*holders, *sent]:
                t.cancel()
            for resp in await asyncio.gather(*sent, return_exceptions=True):
                if isinstance(resp, aiohttp.ClientResponse):
                    resp.close()
            await asyncio.gather(*holders, return_exceptions=True)
    print(f"{REQUESTS} decisions in {time.monotonic() - started:.1f} s; disagreements: {disagreements}")
    assert not disagreements, disagreements
