"""State outlives processes: a second gateway replica, a killed backend, a killed gateway."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support.procs import Proc, start_gateway, start_redis, start_sim

MODEL = "sim-llama"


class Cluster:
    def __init__(self, tmp: Path, cfg: dict[str, object], sims: list[Proc], gateways: list[Proc]) -> None:
        self.tmp, self.cfg, self.sims, self.gateways = tmp, cfg, sims, gateways

    def client(self, i: int) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.gateways[i].port}/v1", api_key="unused",
                             max_retries=0)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("durable")
    redis = start_redis(tmp)
    sims = [start_sim(tmp, MODEL, ["--profile", "tiny", "--time-scale", "20"]) for _ in range(2)]
    cfg: dict[str, object] = {
        "server": {"debug_headers": True, "connect_timeout_s": 1},
        "state": {"redis_url": f"redis://127.0.0.1:{redis.port}/0"},
        "backends": [{"name": f"sim-{i}", "url": f"http://127.0.0.1:{s.port}", "models": [MODEL]}
                     for i, s in enumerate(sims)],
    }
    gateways = [start_gateway(tmp, cfg) for _ in range(2)]
    c = Cluster(tmp, cfg, sims, gateways)
    try:
        yield c
    finally:
        for p in (*c.gateways, *sims, redis):
            p.stop()


def _grew(before: openai.types.responses.Response, after: openai.types.responses.Response) -> bool:
    assert before.usage is not None and after.usage is not None
    return after.usage.input_tokens > before.usage.input_tokens + before.usage.output_tokens


def test_two_gateway_replicas_share_one_redis(cluster: Cluster) -> None:
    a, b = cluster.client(0), cluster.client(1)
    r1 = a.responses.create(model=MODEL, input="Hello from replica A.", max_output_tokens=8)
    r2 = b.responses.create(model=MODEL, input="Continued on B.", previous_response_id=r1.id, max_output_tokens=8)
    assert _grew(r1, r2)
    assert b.responses.retrieve(r1.id).output_text == r1.output_text
    conv = a.conversations.create()
    b.responses.create(model=MODEL, input="Into the conversation via B.", conversation=conv.id, max_output_tokens=4)
    assert [i.type for i in a.conversations.items.list(conv.id).data] == ["message", "message"]


def test_continue_after_the_backend_that_served_it_died(cluster: Cluster) -> None:
    c = cluster.client(0)
    raw = c.responses.with_raw_response.create(model=MODEL, input="Which backend?", max_output_tokens=8)
    r1, served = raw.parse(), raw.headers["x-gravity-backend"]
    victim = int(served.removeprefix("sim-"))
    cluster.sims[victim].kill()
    raw2 = c.responses.with_raw_response.create(model=MODEL, input="Still there?", previous_response_id=r1.id,
                                                max_output_tokens=8)
    assert raw2.headers["x-gravity-backend"] != served
    assert _grew(r1, raw2.parse())


def test_continue_after_the_gateway_process_was_killed(cluster: Cluster) -> None:
    r1 = cluster.client(0).responses.create(model=MODEL, input="Before the crash.", max_output_tokens=8)
    conv = cluster.client(0).conversations.create(items=[{"type": "message", "role": "user", "content": "hi"}])
    cluster.gateways[0].kill()
    cluster.gateways[0] = start_gateway(cluster.tmp, cluster.cfg)
    c = cluster.client(0)
    r2 = c.responses.create(model=MODEL, input="After the restart.", previous_response_id=r1.id, max_output_tokens=8)
    assert _grew(r1, r2)
    c.responses.create(model=MODEL, input="And the conversation.", conversation=conv.id, max_output_tokens=4)
    assert len(c.conversations.items.list(conv.id).data) == 3
