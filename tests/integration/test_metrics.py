"""/metrics as an operator reads it: each kind of request moves exactly the series it should, by the
right amounts (real gateway, real simulators, real redis-server, the openai SDK as client)."""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from policies.keys import hash_key
from tests.support.procs import Proc, start_gateway, start_redis, start_sim

pytestmark = pytest.mark.slow

MODEL = "sim-llama"
FREE, METERED = "key-free-metrics", "key-metered-metrics"
Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Fleet:
    def __init__(self, gw: Proc, sims: list[Proc]) -> None:
        self.gw, self.sims = gw, sims
        self.base = f"http://127.0.0.1:{gw.port}"

    def client(self, key: str = FREE) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0, timeout=60)

    def scrape(self) -> Series:
        text = _get(self.base + "/metrics")
        out: Series = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out


def _get(url: str) -> str:
    async def go() -> str:
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            assert r.status == 200, await r.text()
            return await r.text()
    return asyncio.run(go())


def _post(url: str, body: dict[str, Any]) -> None:
    async def go() -> None:
        async with aiohttp.ClientSession() as s, s.post(url, data=json.dumps(body)) as r:
            assert r.status == 200, await r.text()
    asyncio.run(go())


def value(series: Series, name: str, **labels: str) -> float:
    """The sum of `name` over every series whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in series.items() if n == name and want <= ls)


def delta(before: Series, after: Series, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp: Path = tmp_path_factory.mktemp("metrics")
    redis = start_redis(tmp)
    sims = [start_sim(tmp, MODEL, ["--profile", "tiny"]) for _ in range(2)]
    keys = [{"name": "free", "sha256": hash_key(FREE), "tenant": "team-a"},
            {"name": "metered", "sha256": hash_key(METERED), "tenant": "team-b", "limits": {"rpm": 1}}]
    cfg = {
        "server": {"debug_headers": True},
        "state": {"redis_url": f"redis://127.0.0.1:{redis.port}/0"},
        "backends": [{"name": f"sim-{i}", "url": f"http://127.0.0.1:{s.port}", "models": [MODEL]}
                     for i, s in enumerate(sims)],
        "policies": {"auth": {"enabled": True, "keys": keys}},
        "resilience": {"circuit": {"consecutive_failures": 2, "open_s": 60}},
    }
    gw = start_gateway(tmp, cfg)
    try:
        yield Fleet(gw, sims)
    finally:
        for p in (gw, *sims, redis):
            p.stop()


CHAT = "chat/completions"


def test_non_streamed_chat_moves_requests_tokens_routing_and_attempts(fleet: Fleet) -> None:
    before = fleet.scrape()
    raw = fleet.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "metrics: a plain chat request"}], max_tokens=7,
        extra_body={"ignore_eos": True})
    reply = raw.parse()
    after = fleet.scrape()
    backend = raw.headers["x-gravity-backend"]
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens == 7
    ok = {"route": CHAT, "model": MODEL}
    assert delta(before, after, "gravity_requests_total", **ok, backend=backend, status="200") == 1
    assert delta(before, after, "gravity_requests_total") == 1  # nothing else was counted
    assert delta(before, after, "gravity_request_duration_seconds_count", **ok, status="200") == 1
    assert 0 < delta(before, after, "gravity_request_duration_seconds_sum", **ok) < 60
    for kind, n in (("input", usage.prompt_tokens), ("output", usage.completion_tokens)):
        assert delta(before, after, "gravity_tokens_total", tenant="team-a", model=MODEL, type=kind) == n
        assert delta(before, after, "gravity_backend_tokens_total", backend=backend, type=kind) == n
    # Not a stream: no first token the gateway could see.
    assert delta(before, after, "gravity_time_to_first_token_seconds_count") == 0
    assert delta(before, after, "gravity_upstream_attempts_total", backend=backend, kind="first") == 1
    assert delta(before, after, "gravity_upstream_attempts_total") == 1
    # One routing decision, for the endpoint that answered, and every plugin of the profile timed once.
    assert delta(before, after, "gravity_routing_decisions_total", endpoint=backend) == 1
    assert delta(before, after, "gravity_routing_decisions_total") == 1
    assert delta(before, after, "gravity_scheduler_duration_seconds_count") == 1
    plugins = {dict(ls)["plugin"] for (n, ls), v in after.items()
               if n == "gravity_scheduler_plugin_duration_seconds_count" and v > value(
                   before, n, **dict(ls))}
    assert len(plugins) >= 3, plugins
    for plugin in plugins:
        assert delta(before, after, "gravity_scheduler_plugin_duration_seconds_count", plugin=plugin) == 1


def test_streamed_chat_moves_ttft_and_time_per_output_token(fleet: Fleet) -> None:
    before = fleet.scrape()
    started = time.monotonic()
    raw = fleet.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "metrics: a streamed request"}], max_tokens=12,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(raw.parse())
    took = time.monotonic() - started
    after = fleet.scrape()
    backend = raw.headers["x-gravity-backend"]
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 12
    labels = {"route": CHAT, "model": MODEL, "backend": backend}
    assert delta(before, after, "gravity_time_to_first_token_seconds_count", **labels) == 1
    assert 0 < delta(before, after, "gravity_time_to_first_token_seconds_sum", **labels) < took
    assert delta(before, after, "gravity_time_per_output_token_seconds_count", **labels) == 1
    assert 0 < delta(before, after, "gravity_time_per_output_token_seconds_sum", **labels) < took / 11
    assert delta(before, after, "gravity_requests_total", route=CHAT, backend=backend, status="200") == 1
    assert delta(before, after, "gravity_tokens_total", tenant="team-a", type="output") == 12
    assert delta(before, after, "gravity_tokens_total", tenant="team-a", type="input") == usage.prompt_tokens


def test_completions_and_embeddings_are_counted_under_their_routes(fleet: Fleet) -> None:
    before = fleet.scrape()
    c = fleet.client()
    done = c.completions.create(model=MODEL, prompt="metrics: a legacy completion", max_tokens=3)
    emb = c.embeddings.create(model=MODEL, input="metrics: an embedding")
    after = fleet.scrape()
    assert delta(before, after, "gravity_requests_total", route="completions", status="200") == 1
    assert delta(before, after, "gravity_requests_total", route="embeddings", status="200") == 1
    assert delta(before, after, "gravity_requests_total") == 2
    assert done.usage is not None and emb.usage is not None
    assert delta(before, after, "gravity_tokens_total", type="input") == done.usage.prompt_tokens + \
        emb.usage.prompt_tokens
    assert delta(before, after, "gravity_tokens_total", type="output") == done.usage.completion_tokens


def test_a_rate_limited_request_shows_in_rejections_and_redis_latency(fleet: Fleet) -> None:
    before = fleet.scrape()
    c = fleet.client(METERED)
    c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "metered 1"}], max_tokens=2)
    with pytest.raises(openai.RateLimitError):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "metered 2"}], max_tokens=2)
    after = fleet.scrape()
    assert delta(before, after, "gravity_ratelimit_rejections_total", scope="key", limit="rpm") == 1
    assert delta(before, after, "gravity_ratelimit_rejections_total") == 1
    assert delta(before, after, "gravity_admission_rejections_total", code="rate_limit_exceeded") == 1
    assert delta(before, after, "gravity_requests_total", route=CHAT, model="_unrouted", status="429") == 1
    assert delta(before, after, "gravity_tokens_total", tenant="team-b", type="output") == 2  # only the first
    # Both decisions were one rate-limit script call each in Redis, timed.
    assert delta(before, after, "gravity_redis_operation_duration_seconds_count", operation="ratelimit_reserve") == 2
    assert delta(before, after, "gravity_redis_operation_errors_total") == 0


def test_sessions_time_their_redis_reads_and_writes(fleet: Fleet) -> None:
    before = fleet.scrape()
    fleet.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "session turn"}],
                                           max_tokens=2, extra_headers={"x-session-id": "metrics-session"})
    after = fleet.scrape()
    assert delta(before, after, "gravity_redis_operation_duration_seconds_count", operation="get") == 1
    assert delta(before, after, "gravity_redis_operation_duration_seconds_count", operation="set") == 1
    assert delta(before, after, "gravity_redis_operation_duration_seconds_count", operation="ratelimit_reserve") == 0


def test_a_responses_call_times_its_state_scripts(fleet: Fleet) -> None:
    c = fleet.client()
    first = c.responses.create(model=MODEL, input="metrics: a stored response", max_output_tokens=3)
    # Each script's first run is two round trips (EVALSHA answered NOSCRIPT, then sent): warm both.
    second = c.responses.create(model=MODEL, input="a continuation", max_output_tokens=3,
                                previous_response_id=first.id)
    before = fleet.scrape()
    c.responses.create(model=MODEL, input="and another", max_output_tokens=3, previous_response_id=second.id)
    after = fleet.scrape()
    for script in ("state_history", "state_save_response"):
        assert delta(before, after, "gravity_redis_operation_duration_seconds_count", operation=script) == 1, script
    assert delta(before, after, "gravity_redis_operation_errors_total") == 0
    assert delta(before, after, "gravity_requests_total", route=CHAT, status="200") == 1


def test_prefix_match_ratio_is_high_for_a_repeated_prompt(fleet: Fleet) -> None:
    prompt = "metrics prefix test: " + " ".join(f"word{i}" for i in range(400))
    c = fleet.client()
    seen = []
    for _ in range(2):
        before = fleet.scrape()
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=2)
        after = fleet.scrape()
        assert delta(before, after, "gravity_prefix_match_ratio_count") == 1
        seen.append((delta(before, after, "gravity_prefix_match_ratio_bucket", le="0.0"),
                     delta(before, after, "gravity_prefix_match_ratio_bucket", le="0.75")))
    # The first time the prompt is cached nowhere (ratio 0); the second, where it went (> 0.75).
    assert seen == [(1, 1), (0, 0)], seen


def test_in_flight_counts_an_open_stream_and_returns_to_zero(fleet: Fleet) -> None:
    assert value(fleet.scrape(), "gravity_requests_in_flight") == 0
    stream = fleet.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "metrics: a long stream"}], max_tokens=400,
        stream=True, extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it)
    during = value(fleet.scrape(), "gravity_requests_in_flight")
    for _ in it:
        pass
    assert during == 1
    assert value(fleet.scrape(), "gravity_requests_in_flight") == 0


def test_bad_requests_are_counted_without_a_model_label(fleet: Fleet) -> None:
    before = fleet.scrape()
    with pytest.raises(openai.BadRequestError):
        fleet.client().chat.completions.create(model="x" * 300, messages="not a list", max_tokens=2)  # type: ignore[arg-type]
    after = fleet.scrape()
    assert delta(before, after, "gravity_requests_total", route=CHAT, model="_unrouted", status="400") == 1
    assert not any("x" * 300 in str(ls) for _, ls in after)


def test_a_failing_backend_shows_retries_and_an_open_circuit(fleet: Fleet) -> None:
    """Last in the file: the circuit of sim-1 stays open for a minute."""
    before = fleet.scrape()
    assert value(before, "gravity_circuit_state", backend="sim-1", state="closed") == 1
    assert value(before, "gravity_circuit_state", backend="sim-1", state="open") == 0
    _post(f"http://127.0.0.1:{fleet.sims[1].port}/admin/faults", {"fail_next": 100, "fail_status": 500})
    c = fleet.client()
    retried = 0
    for i in range(40):
        raw = c.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": f"circuit probe {i}"}], max_tokens=2)
        assert raw.headers["x-gravity-backend"] == "sim-0"
        retried += raw.headers.get("x-gravity-attempts") == "2"
        if value(fleet.scrape(), "gravity_circuit_state", backend="sim-1", state="open") == 1:
            break
    after = fleet.scrape()
    _post(f"http://127.0.0.1:{fleet.sims[1].port}/admin/faults", {"fail_next": 0})
    assert retried == 2  # consecutive_failures: 2 opened it
    assert value(after, "gravity_circuit_state", backend="sim-1", state="open") == 1
    assert value(after, "gravity_circuit_state", backend="sim-1", state="closed") == 0
    assert value(after, "gravity_circuit_state", backend="sim-0", state="closed") == 1
    assert delta(before, after, "gravity_circuit_transitions_total", backend="sim-1", state="open") == 1
    assert delta(before, after, "gravity_upstream_retries_total", backend="sim-1", failure="status") == 2
    assert delta(before, after, "gravity_upstream_attempts_total", backend="sim-0", kind="retry") == 2
    assert delta(before, after, "gravity_upstream_errors_total", backend="sim-1", reason="status") == 2
