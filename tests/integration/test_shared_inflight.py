"""Gateway replicas share their in-flight counts through one real Redis (docs/state.md, ADR 0005).

Three `gravity serve` processes, two simulators. gw0 knows only sim-0, so whatever it holds open
loads sim-0; the others must count it, route around it, end at zero once everything settles, find
it again after Redis restarts, and forget it when gw0 is SIGKILLed (after `ttl_s`, not never).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from tests.support.procs import Proc, free_port, start_gateway, start_redis, start_sim

MODEL = "sim-llama"
TTL_S, HEARTBEAT_S = 3.0, 0.5
KEY = "gravity:{inflight}"


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.redis_port = free_port()
        self.procs: list[Proc] = []
        self.redis = start_redis(tmp, self.redis_port)
        self.sims = [start_sim(tmp, MODEL, ["--profile", "tiny"]) for _ in range(2)]
        self.backends = [{"name": f"sim-{i}", "url": f"http://127.0.0.1:{s.port}", "models": [MODEL]}
                         for i, s in enumerate(self.sims)]
        self.gateways = [self.start_gateway(only_first=(i == 0)) for i in range(3)]

    def start_gateway(self, only_first: bool = False) -> Proc:
        cfg = {"backends": self.backends[:1] if only_first else self.backends,
               "routing": {"scrape_interval_s": 0.25, "scrape_timeout_s": 2.0, "stale_after_s": 10.0},
               "state": {"redis_url": f"redis://127.0.0.1:{self.redis_port}/0",
                         "shared_inflight": {"ttl_s": TTL_S, "heartbeat_s": HEARTBEAT_S}}}
        return start_gateway(self.tmp, cfg)

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.gateways[i].port}"

    def restart_redis(self) -> None:
        self.redis.stop()
        self.redis = start_redis(self.tmp, self.redis_port)

    def stored(self) -> dict[str, str]:
        client = redis.Redis(port=self.redis_port, decode_responses=True)
        try:
            return client.hgetall(KEY)  # type: ignore[return-value]
        finally:
            client.close()

    def stop(self) -> None:
        for p in [*self.gateways, *self.sims, self.redis]:
            p.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # One cluster for the module (the tests run in file order; the last one kills gw0).
    c = Cluster(tmp_path_factory.mktemp("shared"))
    try:
        yield c
    finally:
        c.stop()


def _body(i: int, max_tokens: int = 4, stream: bool = False) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": max_tokens, "ignore_eos": True, "stream": stream,
            "messages": [{"role": "user", "content": f"request {i}: " + "tell me about routing " * (i % 5 + 1)}]}


async def _hold(s: aiohttp.ClientSession, base: str, n: int) -> list[aiohttp.ClientResponse]:
    """`n` streams each past its first chunk and left open (tiny profile, thousands of tokens to go)."""
    out = []
    for i in range(n):
        r = await s.post(f"{base}/v1/chat/completions", json=_body(1000 + i, max_tokens=4000, stream=True))
        assert r.status == 200, await r.text()
        await r.content.readline()
        out.append(r)
    return out


async def _release(held: list[aiohttp.ClientResponse]) -> None:
    for r in held:
        r.close()


async def _others(s: aiohttp.ClientSession, base: str) -> dict[str, int]:
    """Other replicas' in-flight requests per backend as `base` sees them after a fresh read."""
    async with s.post(f"{base}/admin/route", json=_body(0)) as r:
        assert r.status == 200, await r.text()
    async with s.get(f"{base}/admin/backends") as r:
        backends = await r.json()
    return {name: b["inflight"]["other_replicas"]["requests"] for name, b in backends.items()}


async def _until(check: Any, timeout: float, what: str) -> float:
    start = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        await asyncio.sleep(0.1)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def test_replicas_count_each_others_requests_and_route_around_them(
        cluster: Cluster, session: aiohttp.ClientSession) -> None:
    held = await _hold(session, cluster.url(0), 4)
    try:
        assert (await _others(session, cluster.url(1)))["sim-0"] == 4
        assert (await _others(session, cluster.url(2)))["sim-0"] == 4
        own = await _others(session, cluster.url(0))
        assert own == {"sim-0": 0}, "a replica must not count its own requests twice"
        # Both backends idle but for gw0's streams (which a scrape shows as running, not waiting):
        # only the shared counts tell gw1 that sim-0 is busy.
        picks = []
        for i in range(20):
            async with session.post(f"{cluster.url(1)}/admin/route", json=_body(i)) as r:
                picks.append((await r.json())["backend"])
        assert picks == ["sim-1"] * 20, picks
    finally:
        await _release(held)
    await _until(lambda: _zero(session, cluster, [1, 2]), 10, "counts back to zero after the streams closed")


async def _zero(session: aiohttp.ClientSession, cluster: Cluster, gateways: list[int]) -> bool:
    for g in gateways:
        if any((await _others(session, cluster.url(g))).values()):
            return False
    return True


async def test_counts_come_back_after_redis_restarts_and_requests_keep_flowing(
        cluster: Cluster, session: aiohttp.ClientSession) -> None:
    held = await _hold(session, cluster.url(0), 3)
    try:
        assert (await _others(session, cluster.url(1)))["sim-0"] == 3
        cluster.redis.stop()
        # Redis down: routing falls back to each replica's own counts; requests are answered.
        for i in range(6):
            async with session.post(f"{cluster.url(1 + i % 2)}/v1/chat/completions", json=_body(i)) as r:
                assert r.status == 200, await r.text()
        cluster.restart_redis()  # empty: no persistence
        took = await _until(lambda: _sees(session, cluster.url(1), 3), HEARTBEAT_S + 5,
                            "counts rewritten into the restarted Redis")
        assert took <= HEARTBEAT_S + 3, took
    finally:
        await _release(held)
    await _until(lambda: _zero(session, cluster, [1, 2]), 10, "counts back to zero after the streams closed")
    log = cluster.gateways[1].log()
    assert log.count("shared in-flight counts unavailable") == 1, log


async def _sees(session: aiohttp.ClientSession, base: str, n: int) -> bool:
    try:
        return (await _others(session, base)).get("sim-0") == n
    except AssertionError:
        return False


async def test_counts_settle_to_zero_after_load_with_abandoned_streams(
        cluster: Cluster, session: aiohttp.ClientSession) -> None:
    async def one(i: int) -> None:
        base = cluster.url(i % 3)
        if i % 4 == 3:  # a client that walks away mid-stream
            r = await session.post(f"{base}/v1/chat/completions", json=_body(i, max_tokens=400, stream=True))
            await r.content.readline()
            r.close()
            return
        async with session.post(f"{base}/v1/chat/completions", json=_body(i, max_tokens=16)) as r:
            assert r.status == 200, await r.text()

    sem = asyncio.Semaphore(8)

    async def bounded(i: int) -> None:
        async with sem:
            await one(i)

    await asyncio.gather(*(bounded(i) for i in range(90)))

    def counts() -> list[str]:
        return [v for f, v in cluster.stored().items() if "|" in f]

    async def settled() -> bool:
        return counts() == [] and await _zero(session, cluster, [0, 1, 2])

    await _until(settled, 10, "every count back to zero")
    assert len([f for f in cluster.stored() if "|" not in f]) == 3, cluster.stored()  # three live replicas


async def test_a_killed_replica_stops_counting_after_its_ttl(cluster: Cluster, session: aiohttp.ClientSession) -> None:
    held = await _hold(session, cluster.url(0), 3)
    assert (await _others(session, cluster.url(1)))["sim-0"] == 3
    cluster.gateways[0].kill()  # SIGKILL: no goodbye, its fields stay in Redis
    await _release(held)
    took = await _until(lambda: _zero(session, cluster, [1, 2]), TTL_S + 5, "a dead replica's counts expire")
    assert took <= TTL_S + 1.5, took
    assert [f for f in cluster.stored() if "|" in f] == [], "the dead replica's fields are removed, not just ignored"
