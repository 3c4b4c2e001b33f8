"""A Redis restart costs the gateway no request: stale pooled connections are replaced on first use."""
from __future__ import annotations

from pathlib import Path

import pytest
from openai import OpenAI

from tests.support.procs import running, start_gateway, start_redis, start_sim

# Restarts Redis or the gateway and waits for it: an outage drill (make test-outage).
pytestmark = pytest.mark.outage


def test_first_requests_after_a_redis_restart_succeed(tmp_path: Path) -> None:
    persist = ["--appendonly", "yes", "--appendfsync", "always"]
    redis = start_redis(tmp_path, extra=persist)
    sim = start_sim(tmp_path, extra=["--profile", "tiny"])
    cfg = {"backends": [{"name": "sim-0", "url": f"http://127.0.0.1:{sim.port}", "models": ["sim-llama"]}],
           "state": {"redis_url": f"redis://127.0.0.1:{redis.port}/0"}}
    gateway = start_gateway(tmp_path, cfg)
    with running(gateway, sim):
        c = OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key="unused", max_retries=0)
        # Several stored responses, read concurrently enough that the pool holds several connections.
        ids = [c.responses.create(model="sim-llama", input=f"turn {i}", max_output_tokens=4).id for i in range(4)]
        redis.stop()
        redis = start_redis(tmp_path, port=redis.port, extra=persist)
        with running(redis):
            # Every pooled connection is now dead; none of these may fail (max_retries=0).
            for rid in ids:
                assert c.responses.retrieve(rid).id == rid
            nxt = c.responses.create(model="sim-llama", input="and on", previous_response_id=ids[-1],
                                     max_output_tokens=4)
            assert nxt.previous_response_id == ids[-1]
