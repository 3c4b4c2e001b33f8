"""The Dispatcher through its seam: a scripted Transport plays the backends (no sockets, no patching)."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from gateway.dispatcher import Dispatcher
from gateway.exchange import Exchange
from gateway.logs import OutcomeLog
from gateway.metrics import GatewayMetrics
from gateway.openai_requests import parse_body
from gateway.transport import ConnectFailed, StreamBroken, UpstreamRequest
from gateway.upstream import BackendTarget
from policies.circuit import OPEN, CircuitBoard
from policies.resilience import ResilienceConfig
from policies.retry_budget import RetryBudget, RetryBudgetPolicy
from routing.config import RoutingConfig
from routing.datastore import Datastore
from routing.scheduler import build_scheduler
from routing.types import EndpointSpec, RoutingRequest

NAMES = ("a", "b", "c")


@dataclass
class Reply:
    status: int = 200
    body: bytes = b'{"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}'
    chunks: list[bytes] | None = None
    """A stream: these chunks, then `then`."""
    then: str = "end"
    """end | break | stall"""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0

    @property
    def content_type(self) -> str:
        return "text/event-stream" if self.chunks is not None else "application/json"


class Resp:
    def __init__(self, r: Reply) -> None:
        self.r = r
        self.status = r.status
        self.headers: Mapping[str, str] = {"content-type": r.content_type, **r.headers}
        self.content_type = r.content_type
        self.released = False

    async def read(self) -> bytes:
        await asyncio.sleep(self.r.delay)
        if self.r.then == "break" and self.r.chunks is None:
            raise StreamBroken("reset")
        return self.r.body

    async def chunks(self) -> AsyncIterator[bytes]:
        for c in self.r.chunks or []:
            await asyncio.sleep(0.001)
            yield c
        if self.r.then == "break":
            raise StreamBroken("reset")
        if self.r.then == "stall":
            await asyncio.sleep(3600)

    def release(self) -> None:
        self.released = True


class ScriptedTransport:
    """Each endpoint answers its script in order; "connect" means nothing listens."""

    def __init__(self, script: dict[str, list[Reply | str]]) -> None:
        self.script = {k: list(v) for k, v in script.items()}
        self.sent: list[tuple[str, dict[str, Any]]] = []

    async def send(self, request: UpstreamRequest) -> Resp:
        endpoint = request.url.split("//")[1].split(".")[0]
        self.sent.append((endpoint, orjson.loads(request.body)))
        step = self.script[endpoint].pop(0) if self.script.get(endpoint) else Reply()
        if step == "connect":
            raise ConnectFailed("refused", refused=True)
        if step == "hang":
            await asyncio.sleep(3600)
        assert isinstance(step, Reply)
        return Resp(step)


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _chunk(i: int, text: str, finish: str | None = None, rid: str = "chatcmpl-1") -> bytes:
    return _sse({"id": rid, "object": "chat.completion.chunk", "created": 100 if rid.endswith("1") else 200, "model": "m",
                 "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]})


def _usage(prompt: int, completion: int, rid: str = "chatcmpl-1") -> bytes:
    return _sse({"id": rid, "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
                 "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": prompt + completion}})


def _build(script: dict[str, list[Reply | str]], resilience: dict[str, Any] | None = None,
           budget: RetryBudgetPolicy | None = None) -> tuple[Dispatcher, ScriptedTransport, Datastore]:
    ds = Datastore()
    targets = {}
    for n in NAMES:
        ds.upsert(EndpointSpec(name=n, url=f"http://{n}.test", models=frozenset({"m"})))
        targets[n] = BackendTarget(n, f"http://{n}.test/v1", None, f"http://{n}.test/v1/models", None)
    cfg = ResilienceConfig.model_validate({"timeouts": {"first_byte_s": 0.5, "stall_s": 0.2, "total_s": 5},
                                           **(resilience or {})})
    circuits = CircuitBoard(cfg.circuit_policy(), lambda: 0.0,
                            lambda e, s: ds.set_circuit_open(e, s == OPEN))
    transport = ScriptedTransport(script)
    scheduler = build_scheduler(RoutingConfig(), ds)

    async def picked(ex: Exchange) -> None:
        return None

    d = Dispatcher(transport, targets, ds, scheduler, circuits, RetryBudget(budget or cfg.budget_policy()), cfg,
                   GatewayMetrics(), OutcomeLog(logging.getLogger("t")), debug_headers=True, picked=picked,
                   reroute=lambda ex: False)
    return d, transport, ds


def _exchange(order: tuple[str, ...], stream: bool = False, **body: Any) -> Exchange:
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream, **body}
    raw = orjson.dumps(payload)
    parsed = parse_body("chat/completions", raw)
    ex = Exchange(request_id="r1", route="chat/completions", model="m", body=parsed.body, raw=raw, stream=stream,
                  client_wants_usage=parsed.wants_usage, routing=RoutingRequest(model="m", prompt=b"hi"),
                  forward_headers={})
    from routing.types import Candidate, Decision
    ex.decision = Decision("m", "default", [Candidate(n, "", 1.0 - i / 10, None, 10) for i, n in enumerate(order)])
    return ex


class Sink:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def __call__(self, message: Any) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.messages[0]["headers"]}

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])

    def events(self) -> list[Any]:
        out = []
        for line in self.body.split(b"\n\n"):
            if line.startswith(b"data: "):
                data = line[6:]
                out.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
        return out


async def _run(d: Dispatcher, ex: Exchange) -> Sink:
    sink = Sink()
    await d.run(ex, sink)
    assert sink.messages[-1].get("more_body", False) is False, "the response must end"
    return sink


# -- before the first byte -------------------------------------------------------------------------
@pytest.mark.parametrize("first", ["connect", Reply(500, b"boom"), Reply(502, b""), Reply(503, b"{}"),
                                   Reply(504, b""), Reply(429, b'{"message":"busy"}'), "hang",
                                   Reply(200, then="break")])
async def test_a_retryable_failure_is_invisible_to_the_client(first: Reply | str) -> None:
    d, t, _ = _build({"a": [first]})
    ex = _exchange(("a", "b", "c"))
    sink = await _run(d, ex)
    assert sink.status == 200 and ex.backend == "b"
    assert [e for e, _ in t.sent] == ["a", "b"]
    assert sink.headers["x-gravity-attempts"] == "2"


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_a_client_error_is_answered_as_it_is_without_retrying(status: int) -> None:
    d, t, _ = _build({"a": [Reply(status, b'{"object":"error","message":"bad","type":"BadRequestError"}')]})
    sink = await _run(d, _exchange(("a", "b")))
    assert sink.status == status and [e for e, _ in t.sent] == ["a"]
    assert orjson.loads(sink.body)["error"]["type"] == "invalid_request_error"


async def test_all_refusing_is_a_503_with_retry_after_not_a_502() -> None:
    d, _t, ds = _build({n: ["connect"] for n in NAMES})
    sink = await _run(d, _exchange(NAMES))
    assert sink.status == 503 and sink.headers["retry-after"] == "1"
    assert orjson.loads(sink.body)["error"]["code"] == "no_healthy_backend"
    assert all(not e.healthy for e in ds.snapshot()), "a refused connection takes an endpoint out at once"


async def test_the_last_real_failure_is_what_the_client_gets() -> None:
    d, _, _ = _build({"a": [Reply(503, b'{"message":"a busy"}')], "b": [Reply(500, b'{"message":"b broke"}',
                                                                            headers={"retry-after": "3"})],
                      "c": [Reply(502, b'{"message":"c gone"}', headers={"retry-after": "9"})]})
    sink = await _run(d, _exchange(NAMES))
    assert sink.status == 502 and orjson.loads(sink.body)["error"]["message"] == "c gone"
    assert sink.headers["retry-after"] == "9"


async def test_first_byte_timeouts_exhausted_are_a_504() -> None:
    d, _, _ = _build({n: ["hang"] for n in NAMES})
    sink = await _run(d, _exchange(NAMES))
    assert sink.status == 504


async def test_the_retry_budget_caps_retries_gateway_wide() -> None:
    d, t, _ = _build({n: [Reply(503, b"")] * 50 for n in NAMES},
                     budget=RetryBudgetPolicy(ratio=0.1, min_per_s=0.0, window_s=60))
    statuses = [(await _run(d, _exchange(NAMES))).status for _ in range(20)]
    assert statuses == [503] * 20
    assert len(t.sent) <= 20 + 2 + 1, "about 10 % retries, not 2 more attempts per request"


async def test_consecutive_failures_open_a_circuit_and_routing_avoids_it() -> None:
    d, t, ds = _build({"a": [Reply(500, b"")] * 10}, {"circuit": {"consecutive_failures": 3, "open_s": 30}})
    for _ in range(3):
        await _run(d, _exchange(("a", "b")))
    assert ds.snapshot().endpoints["a"].circuit_open
    t.sent.clear()
    sink = await _run(d, _exchange(("a", "b")))
    assert sink.status == 200 and [e for e, _ in t.sent] == ["b"]


# -- streams ----------------------------------------------------------------------------------------
TEXT = ["Hello", " brave", " new", " world", "."]


def _stream(first: int, last: int, usage: bool, then: str = "end", rid: str = "chatcmpl-1") -> Reply:
    chunks = [_chunk(i, TEXT[i], "length" if i == len(TEXT) - 1 else None, rid) for i in range(first, last)]
    if usage:
        chunks.append(_usage(10 + first, last - first, rid))
    if then == "end":
        chunks.append(b"data: [DONE]\n\n")
    return Reply(chunks=chunks, then=then)


@pytest.mark.parametrize("how", ["break", "stall"])
async def test_a_broken_stream_is_resumed_on_another_endpoint_as_one_stream(how: str) -> None:
    d, t, _ = _build({"a": [_stream(0, 2, False, then=how)], "b": [_stream(2, 5, True, rid="chatcmpl-2")]})
    ex = _exchange(("a", "b"), stream=True, max_tokens=5, stream_options={"include_usage": True})
    sink = await _run(d, ex)
    events = sink.events()
    assert events[-1] == "[DONE]"
    content = [e for e in events if e != "[DONE]" and e["choices"]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in content) == "".join(TEXT)
    assert {c["id"] for c in content} == {"chatcmpl-1"} and {c["created"] for c in content} == {100}
    assert content[-1]["x_gravity"] == {"resumes": 1}
    usage = [e for e in events if e != "[DONE]" and e.get("usage")][-1]["usage"]
    assert usage == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    resumed = t.sent[1][1]
    assert resumed["messages"][-1] == {"role": "assistant", "content": "Hello brave"}
    assert resumed["continue_final_message"] is True and resumed["add_generation_prompt"] is False
    assert resumed["max_tokens"] == 3
    assert ex.outcome == "ok"


async def test_the_usage_chunk_the_gateway_asked_for_stays_hidden_across_a_resume() -> None:
    d, _, _ = _build({"a": [_stream(0, 3, False, then="break")], "b": [_stream(3, 5, True)]})
    ex = _exchange(("a", "b"), stream=True, max_tokens=5)
    events = (await _run(d, ex)).events()
    assert not any(e != "[DONE]" and e.get("usage") for e in events)
    assert ex.usage is not None and ex.usage["completion_tokens"] == 5


async def test_a_stream_that_cannot_continue_ends_with_an_error_event_then_done() -> None:
    d, _, _ = _build({"a": [_stream(0, 2, False, then="break")], "b": ["connect"], "c": ["connect"]})
    ex = _exchange(NAMES, stream=True, max_tokens=5)
    events = (await _run(d, ex)).events()
    assert events[-1] == "[DONE]" and "error" in events[-2]
    assert ex.outcome == "upstream_error"


async def test_a_tool_call_in_flight_is_not_resumed() -> None:
    call = _sse({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [
        {"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f",
                                                                                        "arguments": "{\"a"}}]}}]})
    d, t, _ = _build({"a": [Reply(chunks=[call], then="break")]})
    events = (await _run(d, _exchange(("a", "b"), stream=True))).events()
    assert "error" in events[-2] and len(t.sent) == 1


async def test_n_above_one_is_not_resumed() -> None:
    d, t, _ = _build({"a": [_stream(0, 2, False, then="break")]})
    events = (await _run(d, _exchange(("a", "b"), stream=True, n=2))).events()
    assert "error" in events[-2] and len(t.sent) == 1


async def test_a_stream_that_fails_before_its_first_event_is_retried_invisibly() -> None:
    err = Reply(chunks=[_sse({"error": {"message": "engine dead", "type": "server_error"}})])
    d, t, _ = _build({"a": [err], "b": [_stream(0, 5, False)]})
    sink = await _run(d, _exchange(("a", "b"), stream=True))
    assert sink.status == 200 and [e for e, _ in t.sent] == ["a", "b"]
    assert "x_gravity" not in sink.events()[-2]


async def test_a_stream_that_stalls_after_its_first_byte_is_no_success_for_the_circuit() -> None:
    # A replica that stalls every stream mid-way must not keep resetting (or, half-open, close) its
    # circuit with the first byte of each: the circuit judges a stream by its end.
    d, _, ds = _build({"a": [_stream(0, 2, False, then="stall")] * 2, "b": [_stream(2, 5, False)] * 2},
                      {"circuit": {"consecutive_failures": 2, "open_s": 30}})
    for _ in range(2):
        sink = await _run(d, _exchange(("a", "b"), stream=True, max_tokens=5))
        assert sink.events()[-1] == "[DONE]"
    assert ds.snapshot().endpoints["a"].circuit_open
    assert d.circuits.state("b") == "closed"


async def test_a_completions_stream_is_resumed_with_the_prompt_plus_the_partial_text() -> None:
    def text(t: str, rid: str, finish: str | None = None) -> bytes:
        return _sse({"id": rid, "object": "text_completion", "created": 7 if rid == "cmpl-1" else 8, "model": "m",
                     "choices": [{"index": 0, "text": t, "finish_reason": finish}]})
    first = Reply(chunks=[text("Once", "cmpl-1"), text(" upon", "cmpl-1")], then="break")
    rest = Reply(chunks=[text(" a", "cmpl-2"), text(" time", "cmpl-2", "length"), b"data: [DONE]\n\n"])
    d, t, _ = _build({"a": [first], "b": [rest]})
    payload = {"model": "m", "prompt": "Tell me:", "stream": True, "max_tokens": 4}
    raw = orjson.dumps(payload)
    parsed = parse_body("completions", raw)
    ex = Exchange(request_id="r2", route="completions", model="m", body=parsed.body, raw=raw, stream=True,
                  client_wants_usage=parsed.wants_usage, routing=RoutingRequest(model="m", prompt=b"Tell me:"),
                  forward_headers={})
    from routing.types import Candidate, Decision
    ex.decision = Decision("m", "default", [Candidate(n, "", 1.0 - i / 10, None, 10) for i, n in enumerate("ab")])
    events = [e for e in (await _run(d, ex)).events() if e != "[DONE]"]
    assert "".join(e["choices"][0]["text"] for e in events) == "Once upon a time"
    assert {e["id"] for e in events} == {"cmpl-1"} and {e["created"] for e in events} == {7}
    resumed = t.sent[1][1]
    assert resumed["prompt"] == "Tell me:Once upon" and resumed["max_tokens"] == 2


async def test_a_stream_that_stalls_after_its_last_token_still_ends_with_usage_and_done() -> None:
    # The backend sent every token owed (finish_reason included) and then went silent before its usage
    # chunk: nothing is left to resume, but the client asked for usage and must get a clean end.
    stalled = Reply(chunks=[_chunk(i, TEXT[i], "length" if i == 4 else None) for i in range(5)], then="stall")
    d, t, _ = _build({"a": [stalled]})
    ex = _exchange(("a", "b"), stream=True, max_tokens=5, stream_options={"include_usage": True})
    events = (await _run(d, ex)).events()
    assert len(t.sent) == 1, "nothing was owed: no continuation"
    assert events[-1] == "[DONE]"
    usage = events[-2]["usage"]
    assert usage["completion_tokens"] == 5 and usage["total_tokens"] == usage["prompt_tokens"] + 5
    assert events[-2]["id"] == "chatcmpl-1" and events[-2]["choices"] == []
    assert ex.outcome == "ok" and ex.usage is not None and ex.usage["completion_tokens"] == 5
