from __future__ import annotations

import asyncio
import json

import pytest

from routing.scraper import Collector, merge_metrics, parse_model_cards, parse_models, parse_vllm_metrics
from routing.types import EndpointSpec
from tests.unit.routing.helpers import FakeClock, make_datastore

CURRENT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 3.0
vllm:num_requests_waiting{engine="0",model_name="llama"} 7.0
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.42
vllm:prefix_cache_queries_total{engine="0",model_name="llama"} 1000.0
vllm:prefix_cache_hits_total{engine="0",model_name="llama"} 250.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="llama"} 5.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="llama"} 2.0
vllm:cache_config_info{block_size="16",num_gpu_blocks="1000",model_name="llama"} 1.0
vllm:lora_requests_info{max_lora="4",running_lora_adapters="sql,chat",waiting_lora_adapters=""} 1700000000.0
vllm:lora_requests_info{max_lora="4",running_lora_adapters="old",waiting_lora_adapters=""} 1600000000.0
process_start_time_seconds 1.7e9
garbage line {{{
"""

LEGACY = """\
vllm:num_requests_running{model_name="a"} 1
vllm:num_requests_waiting{model_name="a"} 2
vllm:gpu_cache_usage_perc{model_name="a"} 0.9
vllm:num_requests_waiting{model_name="b"} 5
vllm:gpu_cache_usage_perc{model_name="b"} 0.1
"""


def test_parses_current_vllm_names() -> None:
    parsed = parse_vllm_metrics(CURRENT)
    assert set(parsed) == {"llama"}
    m = parsed["llama"]
    assert (m.running, m.waiting, m.kv_usage) == (3, 7, 0.42)
    assert (m.prefix_queries_total, m.prefix_hits_total, m.requests_total) == (1000.0, 250.0, 7.0)
    assert m.kv_capacity_tokens == 16000
    assert m.loras_running == frozenset({"sql", "chat"}) and m.max_loras == 4
    assert m.process_start_time == 1.7e9


def test_parses_legacy_names_per_model_and_merges() -> None:
    parsed = parse_vllm_metrics(LEGACY)
    assert parsed["a"].kv_usage == 0.9 and parsed["b"].waiting == 5
    merged = merge_metrics(parsed)
    assert (merged.waiting, merged.running, merged.kv_usage) == (7, 1, 0.9)


@pytest.mark.parametrize("text", ["", "# only comments\n", 'x{a="1"} NaN\n'])
def test_empty_or_useless_text(text: str) -> None:
    assert all(m.waiting == 0 for m in parse_vllm_metrics(text).values())


def test_label_escapes() -> None:
    text = 'vllm:num_requests_waiting{model_name="we\\"ird,name"} 4\n'
    assert parse_vllm_metrics(text)['we"ird,name'].waiting == 4


def test_parse_models_splits_adapters() -> None:
    body = json.dumps({"data": [{"id": "base"}, {"id": "sql", "parent": "base"}]})
    assert parse_models(body) == ({"base"}, {"sql"})
    assert parse_model_cards(body) == ({"base"}, {"sql": "base"})


class FakeBackends:
    def __init__(self) -> None:
        self.responses: dict[str, tuple[int, str] | Exception] = {}
        self.calls: list[str] = []

    async def fetch(self, url: str) -> tuple[int, str]:
        self.calls.append(url)
        result = self.responses.get(url, (404, ""))
        if result == "hang":
            await asyncio.sleep(10)
        if isinstance(result, Exception):
            raise result
        return result  # type: ignore[return-value]


async def test_collector_discovers_scrapes_and_marks_failures() -> None:
    clock = FakeClock()
    ds = make_datastore(names=("a",), clock=clock)
    ds.upsert(EndpointSpec("k", "http://k", None, models_url="http://k/openai/v1/models"))
    ds.upsert(EndpointSpec("dead", "http://dead", frozenset({"m"})))
    ds.upsert(EndpointSpec("slow", "http://slow", frozenset({"m"})))
    backends = FakeBackends()
    backends.responses = {
        "http://a/metrics": (200, CURRENT),
        "http://k/metrics": (200, LEGACY),
        "http://k/openai/v1/models": (200, json.dumps({"data": [{"id": "m"}]})),
        "http://dead/metrics": ConnectionRefusedError(111, "Connection refused"),
        "http://slow/metrics": "hang",  # type: ignore[dict-item]
    }
    collector = Collector(ds, backends.fetch, interval_s=0.1, timeout_s=0.05, clock=clock)
    await collector.refresh_once()
    snap = ds.snapshot().endpoints
    assert snap["a"].healthy and snap["a"].metrics is not None and snap["a"].metrics.waiting == 7
    assert snap["k"].models == frozenset({"m"}) and snap["k"].metrics.waiting == 7  # type: ignore[union-attr]
    assert not snap["dead"].healthy and "ConnectionRefusedError" in snap["dead"].health_reason
    # A timeout is not yet an outage.
    assert snap["slow"].healthy and collector.consecutive_failures("slow") == 1
    # Discovery is not repeated every cycle.
    await collector.refresh_once()
    assert backends.calls.count("http://k/openai/v1/models") == 1
    await collector.refresh_once()
    snap = ds.snapshot().endpoints
    assert not snap["slow"].healthy and "timed out (3 in a row)" in snap["slow"].health_reason


async def test_collector_run_loops_until_cancelled() -> None:
    ds = make_datastore(names=("a",))
    backends = FakeBackends()
    backends.responses["http://a/metrics"] = (200, CURRENT)
    task = asyncio.create_task(Collector(ds, backends.fetch, interval_s=0.01, timeout_s=0.05).run())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(backends.calls) >= 2


class Scripted:
    """Each fetch of a URL pops the next scripted outcome: (status, text) or an exception to raise."""

    def __init__(self, outcomes: list[tuple[int, str] | BaseException]) -> None:
        self.outcomes = outcomes

    async def fetch(self, url: str) -> tuple[int, str]:
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def _wrapped_refusal() -> OSError:
    # What aiohttp raises: an OSError subclass carrying the errno, raised from the socket error.
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError as inner:
            raise OSError(111, "Cannot connect to host") from inner
    except OSError as outer:
        return outer


OK = (200, CURRENT)


@pytest.mark.parametrize(
    ("outcomes", "healthy_after_each"),
    [
        # Two timeouts are tolerated, the third marks it down, one success restores it.
        ([TimeoutError(), TimeoutError(), TimeoutError(), OK], [True, True, False, True]),
        # HTTP errors and other exceptions count the same way.
        ([(500, ""), RuntimeError("boom"), (503, "")], [True, True, False]),
        # A success in between resets the count.
        ([TimeoutError(), TimeoutError(), OK, TimeoutError(), TimeoutError()], [True, True, True, True, True]),
        # Refused connections mean nothing listens: immediate, however they are wrapped.
        ([ConnectionRefusedError(111, "refused"), OK], [False, True]),
        ([_wrapped_refusal()], [False]),
        ([OK, TimeoutError(), ConnectionRefusedError(111, "refused")], [True, True, False]),
    ],
)
async def test_health_hysteresis(outcomes: list[tuple[int, str] | BaseException], healthy_after_each: list[bool]) -> None:
    ds = make_datastore(names=("a",))
    collector = Collector(ds, Scripted(list(outcomes)).fetch, timeout_s=1.0, unhealthy_after=3)
    seen = []
    for _ in outcomes:
        await collector.refresh_once()
        seen.append(ds.snapshot().endpoints["a"].healthy)
    assert seen == healthy_after_each


async def test_unhealthy_after_one_is_the_old_behaviour_and_zero_is_rejected() -> None:
    ds = make_datastore(names=("a",))
    collector = Collector(ds, Scripted([TimeoutError()]).fetch, unhealthy_after=1)
    await collector.refresh_once()
    assert not ds.snapshot().endpoints["a"].healthy
    with pytest.raises(ValueError, match="unhealthy_after"):
        Collector(ds, Scripted([]).fetch, unhealthy_after=0)


def test_routing_config_carries_the_threshold() -> None:
    from routing.config import RoutingConfig

    assert RoutingConfig().unhealthy_after_failures == 3
    assert RoutingConfig(unhealthy_after_failures=5).unhealthy_after_failures == 5
