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


def test_a_retried_request_has_one_client_span_per_attempt(stack: Stack) -> None:
    sim0 = stack.sims[0]
    stack.faults(sim0, fail_next=1, fail_status=503)
    failed_trace = None
    try:
        for i in range(12):  # distinct prompts until one is routed to sim-0 first and fails there
            header, trace_id, _ = new_traceparent()
            stack.client().chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"retry me {i} {os.urandom(4).hex()}"}],
                max_tokens=3, extra_headers={"traceparent": header})
            if any(r.get("status") == "failed:503" and (r.get("traceparent") or "").split("-")[1:2] == [trace_id]
                   for r in stack.records(sim0)):
                failed_trace = trace_id
                break
    finally:
        stack.faults(sim0, fail_next=0)
    assert failed_trace is not None, "no request was routed to sim-0 first"
    spans = stack.receiver.wait_for(_complete, failed_trace)
    server = _one(spans, kind="SERVER")
    assert server.attributes["http.response.status_code"] == 200 and server.status != "ERROR"
    assert server.attributes["gravity.attempts"] == 2
    attempts = sorted((s for s in spans if s.kind == "CLIENT" and s.name == f"chat {MODEL}"),
                      key=lambda s: s.attributes["gravity.attempt.number"])
    assert [a.parent_span_id for a in attempts] == [server.span_id] * 2
    first, second = attempts
    assert first.attributes["gravity.attempt.endpoint"] == "sim-0"
    assert first.status == "ERROR" and first.attributes["error.type"] == "503"
    assert first.attributes["gravity.attempt.failure"] == "status"
    assert first.attributes["gravity.attempt.kind"] == "first"
    assert second.attributes["gravity.attempt.endpoint"] == "sim-1"
    assert second.attributes["gravity.attempt.kind"] == "retry" and second.status != "ERROR"
    assert second.attributes["gen_ai.usage.output_tokens"] == 3
    assert first.end_ns <= second.start_ns
    # Each backend saw the traceparent of the attempt that reached it.
    assert _upstream_traceparents(stack, failed_trace) == {
        "sim-0": f"00-{failed_trace}-{first.span_id}-01", "sim-1": f"00-{failed_trace}-{second.span_id}-01"}


def test_a_rate_limited_request(stack: Stack) -> None:
    c = stack.client("tiny")
    c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "one"}], max_tokens=2)
    header, trace_id, _ = new_traceparent()
    with pytest.raises(openai.RateLimitError):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": SECRET}], max_tokens=2,
                                  extra_headers={"traceparent": header})
    spans = stack.receiver.wait_for(_complete, trace_id)
    server = _one(spans, kind="SERVER")
    assert server.attributes["http.response.status_code"] == 429
    assert server.status != "ERROR", "a 4xx is the client's error, not the server's"
    assert server.attributes["gravity.outcome"] == "error"
    limit = _one(spans, name="gravity.rate_limit")
    assert limit.parent_span_id == server.span_id
    assert limit.status == "ERROR" and limit.attributes["error.type"] == "rate_limit_exceeded"
    assert limit.attributes["gravity.ratelimit.decision"] == "rejected"
    assert limit.attributes["gravity.ratelimit.bound_scope"] == "key"
    assert limit.attributes["gravity.ratelimit.kind"] == "requests"
    assert not [s for s in spans if s.kind == "CLIENT" or s.name == "gravity.route"], "nothing was routed"
    assert _upstream_traceparents(stack, trace_id) == {}
    _no_prompt(spans)


def test_responses_api_spans_show_state_reads_and_writes(stack: Stack) -> None:
    c = stack.client()
    header, trace_id, _ = new_traceparent()
    first = c.responses.create(model=MODEL, input=SECRET, max_output_tokens=4, extra_headers={"traceparent": header})
    spans = stack.receiver.wait_for(_complete, trace_id)
    server = _one(spans, kind="SERVER")
    assert server.name == "POST /v1/responses" and server.attributes["http.response.status_code"] == 200
    save = _one(spans, name="gravity.state save_response")
    assert save.parent_span_id == server.span_id and save.kind == "CLIENT"
    assert save.attributes["db.system.name"] == "redis"
    client = _one(spans, name=f"chat {MODEL}")
    assert client.parent_span_id == server.span_id
    assert client.end_ns <= save.start_ns, "the response is stored after the backend answered"
    _no_prompt(spans)

    header, trace_id, _ = new_traceparent()
    c.responses.create(model=MODEL, input="And then?", previous_response_id=first.id, max_output_tokens=4,
                       extra_headers={"traceparent": header})
    spans = stack.receiver.wait_for(_complete, trace_id)
    history = _one(spans, name="gravity.state history")
    client = _one(spans, name=f"chat {MODEL}")
    assert history.end_ns <= client.start_ns, "the history is read before the backend is called"
    assert client.attributes["gen_ai.request.previous_response.id"] == first.id
    _one(spans, name="gravity.state save_response")

    conv = c.conversations.create(items=[{"type": "message", "role": "user", "content": "Hi."}])
    header, trace_id, _ = new_traceparent()
    c.responses.create(model=MODEL, input="Hello!", conversation=conv.id, max_output_tokens=4,
                       extra_headers={"traceparent": header})
    spans = stack.receiver.wait_for(_complete, trace_id)
    names = {s.name for s in spans}
    assert {"gravity.state begin_conversation", "gravity.state save_response"} <= names
    assert _one(spans, name=f"chat {MODEL}").attributes["gen_ai.conversation.id"] == conv.id
    header, trace_id, _ = new_traceparent()
    got = c.conversations.retrieve(conv.id, extra_headers={"traceparent": header})
    assert got.id == conv.id
    spans = stack.receiver.wait_for(_complete, trace_id)
    assert _one(spans, kind="SERVER").name == "GET /v1/conversations/{conversation_id}"
    _one(spans, name="gravity.state get_conversation")


def test_a_client_that_leaves_mid_stream_ends_every_span(stack: Stack) -> None:
    header, trace_id, _ = new_traceparent()
    stream = stack.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "a long one"}], max_tokens=2000, stream=True,
        extra_body={"ignore_eos": True}, extra_headers={"traceparent": header})
    next(iter(stream))
    stream.close()
    spans = stack.receiver.wait_for(_complete, trace_id)
    server = _one(spans, kind="SERVER")
    client = _one(spans, kind="CLIENT", name=f"chat {MODEL}")
    assert server.attributes["gravity.outcome"] == "client_disconnect"
    assert client.status == "ERROR" and client.attributes["error.type"] == "cancelled"
    assert client.attributes["gen_ai.response.finish_reasons"] == ["error"]
    # Ended when the client left, not when 2000 tokens would have been generated (~10 s on this profile).
    assert client.duration_s < 5 and server.duration_s < 5


def _metric(port: int, name: str) -> dict[str, float]:
    text = asyncio.run(_text(f"http://127.0.0.1:{port}/metrics"))
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


async def _text(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return await r.text()


@pytest.mark.slow
def test_a_dead_collector_costs_only_dropped_spans(tmp_path: Path) -> None:
    """A collector that accepts connections and never answers: requests are as fast as without tracing,
    the spans the full queue cannot hold are dropped and counted, and so are the batches that time out."""
    import socket

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(1)  # never accepted: the kernel completes a handshake or two, then nothing answers
    sim = start_sim(tmp_path, MODEL, ["--profile", "tiny", "--time-scale", "20"])
    cfg = {"backends": [{"name": "sim-0", "url": f"http://127.0.0.1:{sim.port}", "models": [MODEL]}],
           "state": {"embedded_dir": str(tmp_path / "redis")}}
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{hole.getsockname()[1]}",
           "OTEL_BSP_SCHEDULE_DELAY": "20", "OTEL_BSP_MAX_QUEUE_SIZE": "16", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "8",
           "OTEL_EXPORTER_OTLP_TIMEOUT": "400"}
    traced = start_gateway(tmp_path, cfg, env=env)
    plain = start_gateway(tmp_path, cfg)
    try:
        clients = [openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="x", max_retries=0, timeout=10)
                   for gw in (traced, plain)]

        def timed(c: openai.OpenAI, i: int) -> float:
            t0 = time.perf_counter()
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"m{i}"}], max_tokens=2)
            return time.perf_counter() - t0

        for i in range(3):
            for c in clients:
                timed(c, i)
        # Interleaved, so that the neighbours' load on a shared machine falls on both alike.
        pairs = [(timed(clients[0], i), timed(clients[1], i)) for i in range(30)]
        with_dead = sorted(p[0] for p in pairs)
        without = sorted(p[1] for p in pairs)
        # Medians within 25 ms of each other: the event loop never waited on the collector.
        assert with_dead[15] - without[15] < 0.025, (with_dead[15], without[15])
        deadline = time.monotonic() + 10
        while True:
            dropped = _metric(traced.port, "gravity_trace_spans_dropped_total")
            reasons = {k.split('reason="')[1].split('"')[0]: v for k, v in dropped.items()}
            if reasons.get("queue_full", 0) > 0 and reasons.get("timeout", 0) > 0:
                break
            assert time.monotonic() < deadline, reasons
            time.sleep(0.2)
        assert sum(_metric(traced.port, "gravity_trace_spans_exported_total").values()) == 0
    finally:
        for p in (traced, plain, sim):
            p.stop()
        hole.close()


def test_the_sdk_processor_exports_the_same_tree(tmp_path: Path, stack: Stack) -> None:
    """`processor: thread` (the OpenTelemetry SDK's spans and BatchSpanProcessor, the gRPC path's machinery)."""
    cfg = {"backends": [{"name": "sim-0", "url": f"http://127.0.0.1:{stack.sims[0].port}", "models": [MODEL]}],
           "state": {"embedded_dir": str(tmp_path / "redis")},
           "telemetry": {"endpoint": stack.receiver.endpoint, "processor": "thread",
                         "batch": {"schedule_delay_ms": 50}}}
    gw = start_gateway(tmp_path, cfg)
    try:
        header, trace_id, client_span = new_traceparent()
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="x", max_retries=0)
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": SECRET}], max_tokens=3,
                                  extra_headers={"traceparent": header})
        # The whole tree, not just the SERVER span: the SDK's worker thread exports on its own clock, and
        # what a test sees first must not depend on where a batch happened to be cut.
        spans = stack.receiver.wait_for(lambda got: {"SERVER", "CLIENT"} <= {x.kind for x in got} and {
            "gravity.auth", "gravity.rate_limit", "gravity.route"} <= {x.name for x in got}, trace_id)
        # The simulator's record of the upstream request, which it may write after answering.
        deadline = time.monotonic() + 10
        while not _upstream_traceparents(stack, trace_id) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        gw.stop()
    server = _one(spans, kind="SERVER")
    client = _one(spans, kind="CLIENT", name=f"chat {MODEL}")
    assert server.parent_span_id == client_span and client.parent_span_id == server.span_id
    assert {"gravity.auth", "gravity.rate_limit", "gravity.route"} <= {
        s.name for s in spans if s.parent_span_id == server.span_id}
    assert client.attributes["gen_ai.usage.output_tokens"] == 3
    assert _upstream_traceparents(stack, trace_id) == {"sim-0": f"00-{trace_id}-{client.span_id}-01"}
    _no_prompt(spans)


def test_content_only_when_asked_sessions_and_the_last_spans_at_shutdown(tmp_path: Path, stack: Stack) -> None:
    """Opt-in content, x-session-id as the conversation, an invalid traceparent, and spans still queued
    when SIGTERM comes (a 60 s schedule delay: only the shutdown drain can have sent them)."""
    cfg = {"backends": [{"name": "sim-0", "url": f"http://127.0.0.1:{stack.sims[0].port}", "models": [MODEL]}],
           "state": {"embedded_dir": str(tmp_path / "redis")}, "resilience": {"drain": {"grace_s": 0}}}
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": stack.receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "60000",
           "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true"}
    gw = start_gateway(tmp_path, cfg, env=env)
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="x", max_retries=0)
    try:
        header, trace_id, _ = new_traceparent()
        reply = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": SECRET}], max_tokens=3,
                                          extra_body={"ignore_eos": True},
                                          extra_headers={"traceparent": header, "x-session-id": "sess-42"})
        bad = c.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "bad parent"}], max_tokens=2,
            extra_headers={"traceparent": "00-zz-nope-01", "tracestate": "vendor=stale"})
        time.sleep(0.5)
        assert not stack.receiver.trace(trace_id), "nothing is sent before the schedule delay"
    finally:
        gw.stop()  # SIGTERM: the lifespan drains the export queue
    spans = stack.receiver.wait_for(_complete, trace_id, timeout=5)
    client = _one(spans, kind="CLIENT", name=f"chat {MODEL}")
    a = client.attributes
    assert a["gen_ai.conversation.id"] == "sess-42"
    assert SECRET in a["gen_ai.input.messages"]
    content = reply.choices[0].message.content
    assert content and content in a["gen_ai.output.messages"]
    # The invalid traceparent started a trace of the gateway's own; the stale tracestate went nowhere.
    rid = bad.headers["x-request-id"]
    server = next(s for s in stack.receiver.spans if s.attributes.get("gravity.request_id") == rid)
    assert server.parent_span_id == ""
    record = next(r for r in stack.records(stack.sims[0]) if r["request_id"] == f"chatcmpl-{rid}")
    assert record["traceparent"].split("-")[1] == server.trace_id and record["tracestate"] is None


def test_a_resumed_stream_has_a_resume_attempt_span(tmp_path: Path, stack: Stack) -> None:
    """sim-0 stalls every stream after 3 tokens: a stream that started there is continued on sim-1, and
    the trace shows both attempts, the second as a resume, each with the traceparent its backend saw."""
    cfg = {"backends": [{"name": f"sim-{i}", "url": f"http://127.0.0.1:{s.port}", "models": [MODEL]}
                        for i, s in enumerate(stack.sims)],
           "state": {"embedded_dir": str(tmp_path / "redis")},
           "resilience": {"timeouts": {"first_byte_s": 30, "stall_s": 0.5, "total_s": 60}}}
    gw = start_gateway(tmp_path, cfg, env={"OTEL_EXPORTER_OTLP_ENDPOINT": stack.receiver.endpoint,
                                           "OTEL_BSP_SCHEDULE_DELAY": "50"})
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="x", max_retries=0)
    stack.faults(stack.sims[0], stall_after=3)
    resumed = None
    try:
        for i in range(10):
            header, trace_id, _ = new_traceparent()
            text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"resume me {i} {os.urandom(4).hex()}"}],
                max_tokens=12, stream=True, extra_body={"ignore_eos": True},
                extra_headers={"traceparent": header}) if ch.choices)
            assert text
            spans = stack.receiver.wait_for(_complete, trace_id)
            if any(s.attributes.get("gravity.attempt.kind") == "resume" for s in spans):
                resumed = (trace_id, spans)
                break
    finally:
        stack.faults(stack.sims[0], stall_after=None)
        gw.stop()
    assert resumed is not None, "no stream started on sim-0"
    trace_id, spans = resumed
    server = _one(spans, kind="SERVER")
    attempts = sorted((s for s in spans if s.kind == "CLIENT"), key=lambda s: s.attributes["gravity.attempt.number"])
    assert [a.attributes["gravity.attempt.kind"] for a in attempts] == ["first", "resume"]
    first, resume = attempts
    assert first.attributes["gravity.attempt.endpoint"] == "sim-0" and first.attributes["error.type"] == "stalled"
    assert "gen_ai.response.time_to_first_chunk" in first.attributes
    assert resume.attributes["gravity.attempt.endpoint"] == "sim-1" and resume.status != "ERROR"
    assert all(a.parent_span_id == server.span_id for a in attempts)
    assert server.attributes["gravity.outcome"] == "ok"
    assert _upstream_traceparents(stack, trace_id) == {
        "sim-0": f"00-{trace_id}-{first.span_id}-01", "sim-1": f"00-{trace_id}-{resume.span_id}-01"}
