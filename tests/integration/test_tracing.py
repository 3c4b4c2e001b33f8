"""Traces as a collector receives them: a real OTLP/HTTP receiver, simulators, redis-server, the openai SDK.

Each test sends its own W3C traceparent, waits for that trace at the receiver and checks the span tree
and its attributes; the simulator's request records show what traceparent the backend received.
"""
from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from policies.keys import hash_key
from tests.support.otlp_receiver import OtlpReceiver, RecordedSpan
from tests.support.procs import Proc, start_gateway, start_redis, start_sim

MODEL = "sim-llama"
SECRET = "Tell me about the data gravity of Zanzibar."
"""The prompt: it must appear in no span."""
KEYS = {"traced": {}, "tiny": {"rpm": 1}}


class Stack:
    def __init__(self, receiver: OtlpReceiver, gateway: Proc, sims: list[Proc]) -> None:
        self.receiver, self.gateway, self.sims = receiver, gateway, sims
        self.base = f"http://127.0.0.1:{gateway.port}"

    def client(self, key: str = "traced") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=f"key-{key}", max_retries=0)

    def sim(self, name: str) -> Proc:
        return self.sims[int(name.rsplit("-", 1)[1])]

    def records(self, sim: Proc) -> list[dict[str, Any]]:
        return list(_get(f"http://127.0.0.1:{sim.port}/admin/requests")["requests"])

    def faults(self, sim: Proc, **changes: Any) -> None:
        async def go() -> None:
            async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{sim.port}/admin/faults",
                                                            json=changes) as r:
                assert r.status == 200, await r.text()
        asyncio.run(go())


def _get(url: str) -> Any:
    async def go() -> Any:
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            return await r.json()
    return asyncio.run(go())


def new_traceparent() -> tuple[str, str, str]:
    """(header, trace id, the client's span id)."""
    trace_id, span_id = os.urandom(16).hex(), os.urandom(8).hex()
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def _config(sims: list[Proc], redis: Proc) -> dict[str, Any]:
    return {
        "server": {"debug_headers": True},
        "state": {"redis_url": f"redis://127.0.0.1:{redis.port}/0"},
        "backends": [{"name": f"sim-{i}", "url": f"http://127.0.0.1:{s.port}", "models": [MODEL]}
                     for i, s in enumerate(sims)],
        "policies": {"auth": {"enabled": True, "redis_keys": False,
                              "keys": [{"name": n, "sha256": hash_key(f"key-{n}"), "tenant": f"t-{n}", "limits": lim}
                                       for n, lim in KEYS.items()]}},
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp: Path = tmp_path_factory.mktemp("tracing")
    receiver = OtlpReceiver()
    started: list[Proc] = []
    try:
        redis = start_redis(tmp)
        started.append(redis)
        sims = [start_sim(tmp, MODEL, ["--profile", "tiny"]) for _ in range(2)]
        started += sims
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50",
               "OTEL_SERVICE_NAME": "gravity-under-test"}
        gateway = start_gateway(tmp, _config(sims, redis), env=env)
        started.append(gateway)
        yield Stack(receiver, gateway, sims)
    finally:
        for p in reversed(started):
            p.stop()
        receiver.close()


def _complete(spans: list[RecordedSpan]) -> bool:
    """The SERVER span ends last: once it is in, the whole request's tree is."""
    return any(s.kind == "SERVER" for s in spans)


def _one(spans: list[RecordedSpan], **match: Any) -> RecordedSpan:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in match.items())]
    assert len(found) == 1, (match, [(s.name, s.kind) for s in spans])
    return found[0]


def _no_prompt(spans: list[RecordedSpan]) -> None:
    for s in spans:
        assert SECRET not in repr(s.attributes) and SECRET not in repr(s.events), s.name


def _upstream_traceparents(stack: Stack, trace_id: str) -> dict[str, str]:
    """backend name -> the traceparent it received for this trace."""
    out = {}
    for i, sim in enumerate(stack.sims):
        for r in stack.records(sim):
            tp = r.get("traceparent") or ""
            if tp.split("-")[1:2] == [trace_id]:
                out[f"sim-{i}"] = tp
    return out


def test_streamed_chat_completion_span_tree(stack: Stack) -> None:
    header, trace_id, client_span = new_traceparent()
    started = time.perf_counter()
    stamps = []
    stream = stack.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": SECRET}], max_tokens=24, stream=True, temperature=0.5,
        extra_body={"ignore_eos": True}, extra_headers={"traceparent": header, "tracestate": "vendor=x1"})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter() - started)
    assert stamps and stamps[-1] - stamps[0] > 0.05, "the stream must be relayed as it is produced"
    spans = stack.receiver.wait_for(_complete, trace_id)
    server = _one(spans, kind="SERVER")
    assert server.name == "POST /v1/chat/completions"
    assert server.parent_span_id == client_span, "the gateway joins the client's trace under the client's span"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["http.route"] == "/v1/chat/completions"
    assert server.resource["service.name"] == "gravity-under-test"
    children = {s.name for s in spans if s.parent_span_id == server.span_id}
    assert {"gravity.auth", "gravity.rate_limit", "gravity.route", f"chat {MODEL}"} <= children

    client = _one(spans, kind="CLIENT", name=f"chat {MODEL}")
    a = client.attributes
    assert client.parent_span_id == server.span_id and client.status != "ERROR"
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "vllm"
    assert a["gen_ai.request.model"] == MODEL and a["gen_ai.request.max_tokens"] == 24
    assert a["gen_ai.request.temperature"] == 0.5 and a["gen_ai.request.stream"] is True
    assert a["gen_ai.response.model"] == MODEL and a["gen_ai.response.id"].startswith("chatcmpl-")
    assert a["gen_ai.response.finish_reasons"] == ["length"]
    assert a["gen_ai.usage.output_tokens"] == 24 and a["gen_ai.usage.input_tokens"] > 0
    assert 0 < a["gen_ai.response.time_to_first_chunk"] < client.duration_s
    backend = a["gravity.attempt.endpoint"]
    assert a["server.address"] == "127.0.0.1" and a["server.port"] == stack.sim(backend).port
    assert a["gravity.attempt.number"] == 1 and a["gravity.attempt.kind"] == "first"

    route = _one(spans, name="gravity.route").attributes
    assert route["gravity.route.endpoint"] == backend
    assert sorted(route["gravity.route.candidates"]) == ["sim-0", "sim-1"]
    assert route["gravity.route.profile"]
    assert any(k.startswith("gravity.route.score.") for k in route)
    assert 0.0 <= route["gravity.route.prefix_match_ratio"] <= 1.0
    auth = _one(spans, name="gravity.auth").attributes
    assert auth["gravity.tenant"] == "t-traced"
    assert _one(spans, name="gravity.rate_limit").attributes["gravity.ratelimit.decision"] == "unlimited"
    _no_prompt(spans)

    # The backend received a traceparent of the same trace whose parent is the gateway's CLIENT span,
    # with the client's tracestate carried along.
    received = _upstream_traceparents(stack, trace_id)
    assert received == {backend: f"00-{trace_id}-{client.span_id}-01"}
    record = next(r for r in stack.records(stack.sim(backend)) if r.get("traceparent") == received[backend])
    assert record["tracestate"] == "vendor=x1"


def test_non_streamed_chat_completion(stack: Stack) -> None:
    header, trace_id, _ = new_traceparent()
    reply = stack.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": SECRET}], max_tokens=6, extra_body={"ignore_eos": True},
        extra_headers={"traceparent": header})
    spans = stack.receiver.wait_for(_complete, trace_id)
    client = _one(spans, kind="CLIENT", name=f"chat {MODEL}")
    a = client.attributes
    assert a["gen_ai.request.stream"] is False
    assert "gen_ai.response.time_to_first_chunk" not in a
    assert a["gen_ai.response.id"] == reply.id
    assert reply.usage is not None
    assert a["gen_ai.usage.output_tokens"] == reply.usage.completion_tokens == 6
    assert a["gen_ai.usage.input_tokens"] == reply.usage.prompt_tokens
    assert a["gen_ai.response.finish_reasons"] == ["length"]
    _no_prompt(spans)
    assert _upstream_traceparents(stack, trace_id) == {a["gravity.attempt.endpoint"]:
                                                       f"00-{trace_id}-{client.span_id}-01"}


def test_a_request_without_traceparent_starts_a_trace_the_backend_joins(stack: Stack) -> None:
    raw = stack.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "a fresh trace"}], max_tokens=2)
    rid = raw.headers["x-request-id"]
    spans = stack.receiver.wait_for(lambda ss: any(s.attributes.get("gravity.request_id") == rid for s in ss))
    server = next(s for s in spans if s.attributes.get("gravity.request_id") == rid)
    assert server.parent_span_id == "" and server.kind == "SERVER"
    spans = stack.receiver.wait_for(lambda ss: any(s.kind == "CLIENT" for s in ss), server.trace_id)
    client = _one(spans, kind="CLIENT")
    received = _upstream_traceparents(stack, server.trace_id)
    assert list(received) == [client.attributes["gravity.attempt.endpoint"]]
    _version, trace_id, parent, flags = next(iter(received.values())).split("-")
    # The gateway made the trace id, so it says it is random (W3C trace-context level 2 flag 0x02).
    assert (trace_id, parent) == (server.trace_id, client.span_id) and int(flags, 16) & 0x01
