"""What priority a backend really receives: a recording OpenAI-compatible backend behind real
gateway processes, one sending `priority` upstream and one not. A client cannot promote itself
above its key's `max_priority`, nor smuggle its own `priority` past `priority.upstream: false`."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from policies.keys import hash_key
from tests.support.procs import REPO, Proc, free_port, start_gateway, start_redis

MODEL = "rec-model"


class Recorder:
    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        self.url = f"http://127.0.0.1:{proc.port}"

    async def last(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as s, s.get(self.url + "/_recorded") as r:
            bodies: list[dict[str, Any]] = await r.json()
        return bodies[-1]


KEYS = [
    {"name": "std", "sha256": hash_key("key-std"), "tenant": "a"},
    {"name": "batch", "sha256": hash_key("key-batch"), "tenant": "a", "priority": "sheddable"},
    {"name": "boss", "sha256": hash_key("key-boss"), "tenant": "a", "max_priority": "critical"},
]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("priority")


@pytest.fixture(scope="module")
def redis_proc(tmp: Path) -> Iterator[Proc]:
    proc = start_redis(tmp)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def recorder(tmp: Path) -> Iterator[Recorder]:
    port = free_port()
    proc = Proc([sys.executable, "-m", "tests.support.recorder", str(port)], port, tmp / "recorder.log").start()
    try:
        yield Recorder(proc)
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def gateways(tmp: Path, recorder: Recorder, redis_proc: Proc) -> Iterator[dict[bool, str]]:
    """By `priority.upstream`: the base URL of a gateway with it on and one with it off."""
    procs = []
    try:
        for upstream in (True, False):
            procs.append(start_gateway(tmp, {
                "state": {"redis_url": f"redis://127.0.0.1:{redis_proc.port}/0"},
                "backends": [{"name": "rec", "kind": "openai", "url": recorder.url,
                              "models": [MODEL]}],
                "policies": {"auth": {"enabled": True, "keys": KEYS}, "priority": {"upstream": upstream}},
            }))
        yield {True: f"http://127.0.0.1:{procs[0].port}", False: f"http://127.0.0.1:{procs[1].port}"}
    finally:
        for p in procs:
            p.stop()


async def _send(base: str, key: str, header: str | None = None, **body: Any) -> int:
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    if header:
        headers["x-gravity-priority"] = header
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, **body}
    async with aiohttp.ClientSession() as s, s.post(base + "/v1/chat/completions", data=orjson.dumps(payload),
                                                    headers=headers) as r:
        await r.read()
        return r.status


@pytest.mark.parametrize(("key", "header", "sent"), [
    ("key-std", "critical", 0),  # asks for critical, may have standard
    ("key-std", None, 0),
    ("key-batch", "critical", 10),  # a sheddable key cannot leave its class
    ("key-batch", "standard", 10),
    ("key-boss", "critical", -10),  # max_priority lets this key ask for it
    ("key-boss", None, 0),
    ("key-std", "sheddable", 10),  # asking for less is always allowed
])
async def test_the_backend_gets_the_capped_priority(gateways: dict[bool, str], recorder: Recorder,
                                                    key: str, header: str | None, sent: int) -> None:
    for stream in (False, True):
        assert await _send(gateways[True], key, header, priority=-1000, stream=stream) == 200
        assert (await recorder.last())["priority"] == sent


async def test_without_upstream_priority_a_clients_own_priority_is_stripped(gateways: dict[bool, str],
                                                                            recorder: Recorder) -> None:
    for stream in (False, True):
        assert await _send(gateways[False], "key-std", "critical", priority=-1000, stream=stream) == 200
        sent = await recorder.last()
        assert "priority" not in sent and sent["messages"] == [{"role": "user", "content": "hi"}], sent


def test_keys_cli_stores_max_priority(redis_proc: Proc) -> None:
    url = f"redis://127.0.0.1:{redis_proc.port}/0"
    cmd = [sys.executable, "-m", "gateway", "keys"]
    created = subprocess.run([*cmd, "create", "--redis-url", url, "--name", "ops", "--priority", "standard",
                              "--max-priority", "critical", "--json"], capture_output=True, text=True, cwd=REPO,
                             timeout=30, check=False)
    assert created.returncode == 0, created.stderr
    assert orjson.loads(created.stdout)["max_priority"] == "critical"
    listed = subprocess.run([*cmd, "list", "--redis-url", url], capture_output=True, text=True, cwd=REPO,
                            timeout=30, check=True)
    assert "max_priority=critical" in listed.stdout
    refused = subprocess.run([*cmd, "create", "--redis-url", url, "--name", "bad", "--priority", "critical",
                              "--max-priority", "sheddable"], capture_output=True, text=True, cwd=REPO,
                             timeout=30, check=False)
    assert refused.returncode != 0 and "max_priority" in refused.stderr


@pytest.mark.parametrize(("upstream", "sent"), [(False, None), (True, 0)])
async def test_the_responses_api_sends_the_gateways_priority_only(gateways: dict[bool, str], recorder: Recorder,
                                                                 upstream: bool, sent: int | None) -> None:
    headers = {"authorization": "Bearer key-std", "content-type": "application/json",
               "x-gravity-priority": "critical"}
    payload = {"model": MODEL, "input": "hi", "max_output_tokens": 1, "priority": -1000}
    async with aiohttp.ClientSession() as s, s.post(gateways[upstream] + "/v1/responses", data=orjson.dumps(payload),
                                                    headers=headers) as r:
        assert r.status == 200, await r.text()
    assert (await recorder.last()).get("priority") == sent
