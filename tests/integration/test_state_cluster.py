"""The state layer on a real three-node Redis Cluster: every operation's keys share one slot."""
from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support.procs import Proc, free_port, start_gateway, start_redis, start_sim

MODEL = "sim-llama"


@pytest.fixture(scope="module")
def cluster_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Proc]]:
    tmp = tmp_path_factory.mktemp("cluster")
    nodes: list[Proc] = []
    try:
        for _ in range(3):
            port = free_port()
            # An explicit bus port: the default (port + 10000) may be taken or out of range.
            nodes.append(start_redis(tmp, port, ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000",
                                                 "--cluster-port", str(free_port()),
                                                 "--cluster-config-file", str(tmp / f"nodes-{port}.conf")]))
        subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=30)
        for _ in range(100):  # the nodes agree on the slot map a moment after create returns
            info = subprocess.run(["redis-cli", "-p", str(nodes[0].port), "cluster", "info"],
                                  check=True, capture_output=True, text=True, timeout=5).stdout
            if "cluster_state:ok" in info:
                break
            subprocess.run(["sleep", "0.1"], check=True)
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def test_responses_and_conversations_on_a_redis_cluster(cluster_nodes: list[Proc], tmp_path: Path) -> None:
    sim = start_sim(tmp_path, MODEL, ["--profile", "tiny", "--time-scale", "20"])
    cfg = {"state": {"redis_url": f"redis+cluster://127.0.0.1:{cluster_nodes[1].port}"},
           "backends": [{"name": "sim", "url": f"http://127.0.0.1:{sim.port}", "models": [MODEL]}]}
    gw = start_gateway(tmp_path, cfg)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="unused", max_retries=0)
        # Several threads so their keys land on different nodes; each thread's keys stay in one slot.
        for n in range(4):
            r = c.responses.create(model=MODEL, input=f"thread {n}", max_output_tokens=4,
                                   extra_headers={"x-session-id": f"s{n}"})
            for turn in range(2):
                r = c.responses.create(model=MODEL, input=f"turn {turn}", previous_response_id=r.id,
                                       max_output_tokens=4)
            assert len(c.responses.input_items.list(r.id).data) == 1
            conv = c.conversations.create(items=[{"type": "message", "role": "user", "content": "hi"}])
            for _ in c.responses.create(model=MODEL, input="x", conversation=conv.id, max_output_tokens=4,
                                        stream=True):
                pass
            c.responses.create(model=MODEL, input="y", conversation=conv.id, max_output_tokens=4)
            items = c.conversations.items.list(conv.id, order="asc").data
            assert len(items) == 5
            c.conversations.items.delete(items[0].id, conversation_id=conv.id)
            assert c.conversations.delete(conv.id).deleted
        keys = set()
        for node in cluster_nodes:
            out = subprocess.run(["redis-cli", "-p", str(node.port), "--scan", "--pattern", "gravity:*"],
                                 check=True, capture_output=True, text=True, timeout=5).stdout.split()
            keys.update(out)
        assert any(":resp:" in k for k in keys) and any(":session" in k for k in keys)
        nodes_with_keys = sum(1 for node in cluster_nodes if subprocess.run(
            ["redis-cli", "-p", str(node.port), "dbsize"], check=True, capture_output=True, text=True, timeout=5
        ).stdout.strip() != "0")
        assert nodes_with_keys >= 2  # the state really is spread over the cluster
    finally:
        gw.stop()
        sim.stop()
