"""gateway/proxy.py through the ASGI calls a server makes, with backends scripted behind the Transport
seam (`build_core(cfg, transport=...)`): client disconnects, refusals, and every exchange finished once."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, MutableMapping
from typing import Any

import orjson
import pytest
from starlette.responses import Response

from gateway.config import parse_config
from gateway.core import Core, build_core
from gateway.proxy import ProxyResponse, ProxyRoutes
from gateway.transport import UpstreamRequest

TPD = 10_000  # a day's budget: refill during a test is far below one token
USAGE = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}


class Backend:
    """One scripted answer: a JSON body, or SSE chunks that then stall (a long generation)."""

    def __init__(self, chunks: list[bytes] | None = None) -> None:
        self._chunks = chunks
        self.status = 200
        self.content_type = "text/event-stream" if chunks is not None else "application/json"
        self.headers: Mapping[str, str] = {"content-type": self.content_type}
        self.released = asyncio.Event()

    async def read(self) -> bytes:
        return orjson.dumps({"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                          "finish_reason": "stop"}], "usage": USAGE})

    async def chunks(self) -> AsyncIterator[bytes]:
        for c in self._chunks or []:
            yield c
        await asyncio.sleep(3600)

    def release(self) -> None:
        self.released.set()


class Transport:
    def __init__(self) -> None:
        self.script: list[Backend] = []
        self.sent: list[UpstreamRequest] = []

    async def send(self, request: UpstreamRequest) -> Backend:
        self.sent.append(request)
        return self.script.pop(0)


class Client:
    """The ASGI side of one request: its body, then `http.disconnect` once `leave` is set."""

    def __init__(self, body: dict[str, Any] | bytes) -> None:
        self.body = body if isinstance(body, bytes) else orjson.dumps(body)
        self.leave = asyncio.Event()
        self.sent: list[MutableMapping[str, Any]] = []
        self._body_read = False

    def scope(self, rid: str) -> dict[str, Any]:
        return {"type": "http", "method": "POST", "path": "/v1/chat/completions",
                "raw_path": b"/v1/chat/completions", "scheme": "http", "query_string": b"",
                "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 40000),
                "server": ("127.0.0.1", 8080), "state": {"request_id": rid, "client_request_id": None}}

    async def receive(self) -> MutableMapping[str, Any]:
        if not self._body_read:
            self._body_read = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.leave.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: MutableMapping[str, Any]) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return int(next(m["status"] for m in self.sent if m["type"] == "http.response.start"))

    def header(self, name: str) -> str | None:
        start = next(m for m in self.sent if m["type"] == "http.response.start")
        return next((v.decode() for k, v in start["headers"] if k.decode().lower() == name), None)

    @property
    def body_bytes(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


def _core() -> tuple[Core, ProxyRoutes, Transport]:
    cfg = parse_config({
        "server": {"debug_headers": True},
        "backends": [{"name": "a", "url": "http://a.test", "models": ["m"]}],
        # Redis is never attached: the local limiter holds the budget (the fail-open path).
        "policies": {"tenants": {"default": {"limits": {"tpd": TPD, "concurrency": 1}}},
                     "rate_limits": {"default_max_tokens": 100}},
    })
    transport = Transport()
    core = build_core(cfg, transport=transport)
    proxy = ProxyRoutes(core.pipeline, core.dispatcher, core.metrics, core.outcomes, cfg.server,
                        core.trusted_proxies)
    return core, proxy, transport


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 50}


async def _serve(proxy: ProxyRoutes, client: Client, rid: str) -> None:
    scope = client.scope(rid)
    response = await proxy.handle("chat/completions", scope, client.receive)
    await response(scope, client.receive, client.send)


def _sample(core: Core, name: str, **labels: str) -> float:
    value = core.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def _remaining_after_one_more(core: Core, proxy: ProxyRoutes, transport: Transport) -> int:
    """Serve one more (non-stream) request: it must be admitted (the slot is free); the budget it saw
    left, plus what it reserved, is what the earlier requests left."""
    transport.script.append(Backend())
    probe = Client(CHAT)
    await asyncio.wait_for(_serve(proxy, probe, "probe"), 5)
    assert probe.status == 200, probe.body_bytes
    return int(probe.header("x-ratelimit-remaining-tokens") or -1) + int(probe.header("x-gravity-reserved-tokens") or 0)


async def test_a_client_leaving_mid_stream_closes_the_upstream_and_refunds_once() -> None:
    core, proxy, transport = _core()
    chunk = b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":' \
            b'[{"index":0,"delta":{"content":"hel"},"finish_reason":null}]}\n\n'
    backend = Backend([chunk, chunk])
    transport.script.append(backend)
    client = Client({**CHAT, "stream": True})

    async def send(message: MutableMapping[str, Any]) -> None:
        client.sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            client.leave.set()  # the client reads one chunk and goes away

    client.send = send  # type: ignore[method-assign]
    # Without the watcher the dispatch would wait out the backend's stall (an hour here). Not
    # wait_for: its cancellation would look like the client leaving.
    task = asyncio.create_task(_serve(proxy, client, "r1"))
    done, _ = await asyncio.wait({task}, timeout=3)
    if not done:
        task.cancel()
        pytest.fail("the dispatch kept running after the client left")
    task.result()
    assert backend.released.is_set()
    assert _sample(core, "gravity_client_disconnects_total", route="chat/completions") == 1
    assert _sample(core, "gravity_requests_total", route="chat/completions", model="m", backend="a",
                   status="200") == 1
    # The slot is free again and every reserved token came back.
    assert await _remaining_after_one_more(core, proxy, transport) == TPD


async def test_a_disconnect_after_the_last_byte_is_not_the_client_leaving() -> None:
    core, proxy, transport = _core()
    transport.script.append(Backend())
    client = Client(CHAT)

    async def send(message: MutableMapping[str, Any]) -> None:
        client.sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            client.leave.set()  # uvicorn reports a disconnect once the response is complete
            for _ in range(3):
                await asyncio.sleep(0)  # let the watcher see it before the dispatch returns

    client.send = send  # type: ignore[method-assign]
    await asyncio.wait_for(_serve(proxy, client, "r1"), 5)
    assert client.status == 200 and orjson.loads(client.body_bytes)["usage"] == USAGE
    assert _sample(core, "gravity_client_disconnects_total", route="chat/completions") == 0
    # Settled with the backend's usage, not refunded as an abandoned request.
    assert await _remaining_after_one_more(core, proxy, transport) == (TPD - USAGE["total_tokens"])


@pytest.mark.parametrize(("body", "status", "code"), [
    (b'{"model": "m", "messages": [', 400, None),
    (orjson.dumps({"model": "m"}), 400, None),
])
async def test_a_bad_body_is_an_openai_400_that_reserves_nothing(body: bytes, status: int, code: str | None) -> None:
    core, proxy, transport = _core()
    client = Client(body)
    scope = client.scope("r1")
    response = await proxy.handle("chat/completions", scope, client.receive)
    assert isinstance(response, Response) and not isinstance(response, ProxyResponse)
    await response(scope, client.receive, client.send)
    err = orjson.loads(client.body_bytes)["error"]
    assert client.status == status and err["type"] == "invalid_request_error" and err["message"]
    assert set(err) == {"message", "type", "param", "code"}
    assert transport.sent == []
    assert await _remaining_after_one_more(core, proxy, transport) == TPD


async def test_a_request_refused_after_admission_is_refunded_before_the_error() -> None:
    core, proxy, transport = _core()
    core.datastore.set_circuit_open("a", True)  # admitted, then no endpoint can take it
    client = Client(CHAT)
    await asyncio.wait_for(_serve(proxy, client, "r1"), 5)
    err = orjson.loads(client.body_bytes)["error"]
    assert client.status == 503 and err["code"] == "no_healthy_backend" and client.header("retry-after")
    # The 503 carries the admission's rate-limit headers: the budget was really taken, then given back.
    assert client.header("x-ratelimit-limit-tokens") == str(TPD)
    assert transport.sent == []
    core.datastore.set_circuit_open("a", False)
    assert await _remaining_after_one_more(core, proxy, transport) == TPD
