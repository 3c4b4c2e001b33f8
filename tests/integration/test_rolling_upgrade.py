"""A rolling upgrade: a gateway of the release before issue 9's limiter changes and a current one
share one redis-server and one set of budgets. Limits still hold and neither crashes.

The old gateway is the repository at OLD_COMMIT (extracted with `git archive`), run from this
venv with its tree first on the path; it has the old ratelimit.lua (settlement cuts a bucket's
TTL) and uses request ids as concurrency slot members. See docs/policies.md, "Rolling upgrades".
"""
from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis

from policies.keys import hash_key
from policies.limiter import LUA_SHA
from tests.support.procs import REPO, Proc, free_port, start_gateway, start_redis, start_sim, write_config

# Two gateway releases swapped under load on one Redis: an outage drill (make test-outage).
pytestmark = [pytest.mark.slow, pytest.mark.outage]

OLD_COMMIT = "540546101eddb15a47aeef08c89933e7a843b864"
"""main just before the script's TTL fix and the limiter's own slot members."""
MODEL = "sim-llama"
RPM, TPM = 12, 600
KEYS = {"rpm": {"rpm": RPM, "tpm": 10_000_000}, "conc": {"concurrency": 2}, "tpm": {"tpm": TPM}}


def _old_tree(dest: Path) -> Path:
    found = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{OLD_COMMIT}^{{commit}}"],
                           capture_output=True, check=False)
    if found.returncode != 0:
        pytest.fail(f"the old release {OLD_COMMIT[:12]} is not in this clone's history (a shallow clone?)")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", OLD_COMMIT, "gateway", "policies", "routing",
                              "simulator"], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def _config(sim: Proc, redis_port: int) -> dict[str, Any]:
    return {
        "server": {"debug_headers": True},
        "state": {"redis_url": f"redis://127.0.0.1:{redis_port}/0"},
        "backends": [{"name": "sim", "url": f"http://127.0.0.1:{sim.port}", "models": [MODEL]}],
        "policies": {"auth": {"enabled": True, "redis_keys": False,
                              "keys": [{"name": n, "sha256": hash_key(f"key-{n}"), "tenant": f"t-{n}",
                                        "limits": lim} for n, lim in KEYS.items()]}},
    }


class Mixed:
    def __init__(self, redis_port: int, old: Proc, new: Proc, old_tree: Path) -> None:
        self.redis_port, self.old, self.new, self.old_tree = redis_port, old, new, old_tree

    def url(self, i: int) -> str:
        """Even: the old gateway, odd: the new one."""
        return f"http://127.0.0.1:{(self.old, self.new)[i % 2].port}/v1/chat/completions"


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mixed]:
    tmp: Path = tmp_path_factory.mktemp("upgrade")
    old_tree = _old_tree(tmp / "old")
    started: list[Proc] = []
    try:
        server = start_redis(tmp)
        started.append(server)
        sim = start_sim(tmp, MODEL, ["--profile", "tiny", "--time-scale", "50"])
        started.append(sim)
        cfg = _config(sim, server.port)
        port = free_port()
        path = write_config(tmp, {**cfg, "server": {**cfg["server"], "host": "127.0.0.1", "port": port}})
        # -P: the working directory is not put first on the path, so the old tree's packages win.
        old = Proc([sys.executable, "-P", "-m", "gateway", "serve", "--config", str(path)], port,
                   tmp / f"gateway-old-{port}.log").start(env={"PYTHONPATH": str(old_tree)})
        started.append(old)
        new = start_gateway(tmp, cfg)
        started.append(new)
        yield Mixed(server.port, old, new, old_tree)
    finally:
        for p in reversed(started):
            p.stop()


def _body(content: str, max_tokens: int, **extra: Any) -> bytes:
    return orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}],
                         "max_tokens": max_tokens, "ignore_eos": True, **extra})


def _headers(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer key-{key}", "content-type": "application/json"}


async def _call(s: aiohttp.ClientSession, url: str, key: str, body: bytes) -> tuple[int, dict[str, str], Any]:
    async with s.post(url, data=body, headers=_headers(key)) as r:
        data = await r.read()
        return r.status, {k.lower(): v for k, v in r.headers.items()}, orjson.loads(data) if data else None


def test_both_versions_really_run(mixed: Mixed) -> None:
    async def one_each() -> None:
        async with aiohttp.ClientSession() as s:
            for i in range(2):
                status, _, body = await _call(s, mixed.url(i), "tpm", _body("hello", 1))
                assert status == 200, body

    asyncio.run(one_each())
    old_sha = hashlib.sha1((mixed.old_tree / "policies" / "ratelimit.lua").read_bytes()).hexdigest()
    assert old_sha != LUA_SHA
    client = redis.Redis(port=mixed.redis_port)
    try:
        assert client.script_exists(old_sha, LUA_SHA) == [True, True]
    finally:
        client.close()


async def test_an_rpm_limit_holds_across_versions(mixed: Mixed) -> None:
    """The old gateway's settlements still cut the bucket's TTL to ~1 s; the new one's refusals
    restore it. So the burst goes to the old gateway (the last settlement is an old one), then
    requests alternate: without the restore the hash expires a second later and the budget resets."""
    per_version = [0, 0]
    start = time.monotonic()
    async with aiohttp.ClientSession() as s:
        for i in range(40):
            version = 0 if i < RPM else i % 2
            status, _, body = await _call(s, mixed.url(version), "rpm", _body(f"question {i}", 2))
            assert status in (200, 429), body
            per_version[version] += status == 200
            await asyncio.sleep(max(0.0, start + (i + 1) * 0.2 - time.monotonic()))
    elapsed = time.monotonic() - start
    assert sum(per_version) <= RPM + RPM * elapsed / 60, (per_version, elapsed)
    assert per_version[0] >= RPM, per_version


async def test_concurrency_holds_across_versions_and_both_free_their_slots(mixed: Mixed) -> None:
    async def open_stream(i: int, s: aiohttp.ClientSession) -> tuple[int, Any]:
        r = await s.post(mixed.url(i), data=_body(f"stream {i}", 2000, stream=True), headers=_headers("conc"))
        if r.status != 200:
            body = orjson.loads(await r.read())
            r.release()
            return r.status, body
        return 200, r

    async with aiohttp.ClientSession() as s:
        opened = await asyncio.gather(*(open_stream(i, s) for i in range(10)))
        for status, held in opened:
            if status == 200:
                held.close()
        assert sorted(status for status, _ in opened) == [200] * 2 + [429] * 8, opened
        # Slots taken by either version are freed by it: both admit again once the streams ended.
        for i in range(2):
            deadline = time.monotonic() + 5
            while True:
                status, _, body = await _call(s, mixed.url(i), "conc", _body("after", 1))
                if status == 200 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert status == 200, body


async def test_a_token_budget_holds_across_versions(mixed: Mixed) -> None:
    admitted: list[tuple[int, int]] = []  # (used, reserved)
    window_s = 3.0
    start = time.monotonic()

    async def client(i: int, s: aiohttp.ClientSession) -> None:
        n = 0
        while time.monotonic() - start < window_s:
            n += 1
            status, headers, body = await _call(s, mixed.url(i), "tpm", _body(f"client {i} request {n}", 10))
            if status == 200:
                admitted.append((body["usage"]["total_tokens"], int(headers["x-gravity-reserved-tokens"])))
            else:
                assert status == 429, body
                left = window_s - (time.monotonic() - start)
                await asyncio.sleep(max(0.0, min(int(headers["retry-after-ms"]) / 1000, left)))

    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(client(i, s) for i in range(20)))
    elapsed = time.monotonic() - start
    used = sum(u for u, _ in admitted)
    excess = sum(max(0, u - r) for u, r in admitted)
    # What test_both_versions_really_run spent on this key is still charged: the bound holds a fortiori.
    assert 0 < used <= TPM + TPM * elapsed / 60 + excess, (used, len(admitted))


def test_neither_version_crashed(mixed: Mixed) -> None:
    for proc in (mixed.old, mixed.new):
        assert proc.popen.poll() is None
        assert "Traceback" not in proc.log_path.read_text(errors="replace"), proc.log()
