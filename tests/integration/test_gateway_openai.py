"""The gateway as a user sees it: real simulator processes, a real redis-server, the openai SDK."""
from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.support.procs import Proc, free_port, sim_fleet, start_gateway, start_sim

MODEL = "sim-llama"
MSGS = [{"role": "user", "content": "Tell me about data gravity."}]
EOS = {"ignore_eos": True}  # vLLM stops at a natural end otherwise

pytestmark = pytest.mark.both_stacks  # uvicorn+aiohttp and the gateway's own server+client (conftest.py)


class Stack:
    def __init__(self, gateway: Proc, sims: list[Proc]) -> None:
        self.gateway, self.sims = gateway, sims
        self.base = f"http://127.0.0.1:{gateway.port}"

    def client(self, **kw: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key="unused", max_retries=0, **kw)  # type: ignore[arg-type]

    def aclient(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, gateway_stack: str) -> Iterator[Stack]:
    server = {"debug_headers": True, "max_body_bytes": 64 * 1024, "read_timeout_s": 1.5}
    with sim_fleet(tmp_path_factory.mktemp("stack"), server=server) as fleet:
        yield Stack(fleet.gateway, fleet.sims)


def test_the_stack_under_test_is_the_one_asked_for(stack: Stack, gateway_stack: str) -> None:
    """uvicorn names itself in a `server` header; the gateway's own server sends none."""
    with urllib.request.urlopen(stack.base + "/health", timeout=10) as resp:
        assert (resp.headers.get("server") == "uvicorn") == (gateway_stack == "uvicorn")


def _post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    async def go() -> tuple[int, dict[str, str], bytes]:
        async with aiohttp.ClientSession() as s, s.post(url, data=body, headers=headers or {
                "content-type": "application/json"}) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()
    return asyncio.run(go())


def test_chat_completion_through_the_sdk(stack: Stack) -> None:
    raw = stack.client().chat.completions.with_raw_response.create(model=MODEL, messages=MSGS, max_tokens=8,
                                                                   extra_body=EOS)
    reply = raw.parse()
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens == 8
    assert raw.headers["x-gravity-backend"] in {"sim-0", "sim-1"}
    assert raw.headers["x-gravity-route"].startswith("profile=")
    assert len(raw.headers["x-request-id"]) >= 16


def test_stream_chunks_arrive_before_the_backend_finishes(stack: Stack) -> None:
    stamps: list[float] = []
    text = []
    start = time.perf_counter()
    stream = stack.client().chat.completions.create(
        model=MODEL, messages=MSGS, max_tokens=60, stream=True, extra_body={"ignore_eos": True})
    for chunk in stream:
        stamps.append(time.perf_counter() - start)
        assert chunk.usage is None, "the usage chunk the gateway asked for must not leak"
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
    assert len(text) >= 30
    # 60 decode steps take >= 300 ms on the tiny profile. A buffering proxy would deliver every
    # chunk at once after the backend finished; passed through, the first arrives long before the last.
    assert stamps[-1] - stamps[0] > 0.2, stamps


def test_stream_usage_when_the_client_asks(stack: Stack) -> None:
    chunks = list(stack.client().chat.completions.create(
        model=MODEL, messages=MSGS, max_tokens=5, stream=True, stream_options={"include_usage": True},
        extra_body=EOS))
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0].completion_tokens == 5


async def test_async_client_concurrently(stack: Stack) -> None:
    client = stack.aclient()
    replies = await asyncio.gather(*(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"q{i}"}], max_tokens=4) for i in range(12)))
    assert all(r.choices[0].message.content for r in replies)
    await client.close()


def test_completions_and_embeddings(stack: Stack) -> None:
    c = stack.client()
    comp = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, extra_body=EOS)
    assert comp.choices[0].text and comp.usage and comp.usage.completion_tokens == 6
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=MODEL, prompt="Once", max_tokens=6, stream=True) if ch.choices)
    assert streamed
    emb = c.embeddings.create(model=MODEL, input=["a", "b"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) > 0


def test_models_union_health_ready_metrics(stack: Stack) -> None:
    assert [m.id for m in stack.client().models.list()] == [MODEL]

    async def get(path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as s, s.get(stack.base + path) as r:
            return r.status, await r.text()

    assert asyncio.run(get("/health"))[0] == 200
    status, body = asyncio.run(get("/ready"))
    assert status == 200 and json.loads(body)["status"] == "ready"
    status, body = asyncio.run(get("/metrics"))
    assert 'gravity_requests_total{' in body and 'route="chat/completions"' in body
    assert "gravity_tokens_total" in body
    status, body = asyncio.run(get("/admin/backends"))
    assert set(json.loads(body)) == {"sim-0", "sim-1"}


def test_errors_raise_the_matching_sdk_classes(stack: Stack) -> None:
    c = stack.client()
    with pytest.raises(openai.NotFoundError) as nf:
        c.chat.completions.create(model="no-such-model", messages=MSGS)
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as br:
        c.chat.completions.create(model=MODEL, messages="not a list")  # type: ignore[arg-type]
    assert br.value.param == "messages"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens="ten")  # type: ignore[arg-type]
    with pytest.raises(openai.APIStatusError) as big:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 100_000}])
    assert big.value.status_code == 413


def test_malformed_json_and_unknown_routes(stack: Stack) -> None:
    status, headers, body = _post(stack.base + "/v1/chat/completions", b"{oops")
    err = json.loads(body)["error"]
    assert status == 400 and err["code"] == "invalid_json" and set(err) == {"message", "type", "param", "code"}
    assert headers["x-request-id"]
    status, _, body = _post(stack.base + "/v1/nope", b"{}")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"

    async def get() -> tuple[int, bytes]:
        async with aiohttp.ClientSession() as s, s.get(stack.base + "/v1/chat/completions") as r:
            return r.status, await r.read()

    status, body = asyncio.run(get())
    assert status == 405 and json.loads(body)["error"]["code"] == "method_not_allowed"


def test_request_id_is_kept_when_sane(stack: Stack) -> None:
    body = json.dumps({"model": MODEL, "messages": MSGS, "max_tokens": 2}).encode()
    _, headers, _ = _post(stack.base + "/v1/chat/completions", body,
                          {"content-type": "application/json", "x-request-id": "abc-123"})
    assert headers["x-request-id"] == "abc-123"
    _, headers, _ = _post(stack.base + "/v1/chat/completions", body,
                          {"content-type": "application/json", "x-request-id": "bad id\twith spaces"})
    assert headers["x-request-id"] != "bad id\twith spaces"


def _sim_running(sim: Proc) -> float:
    async def go() -> float:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{sim.port}/metrics") as r:
            text = await r.text()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("vllm:num_requests_running{"))
    return asyncio.run(go())


def test_client_disconnect_closes_the_upstream_request(stack: Stack) -> None:
    c = stack.client()
    streams = [c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2000, stream=True,
                                         extra_body={"ignore_eos": True}) for _ in range(2)]
    for s in streams:
        next(iter(s))
    assert sum(_sim_running(s) for s in stack.sims) >= 2
    for s in streams:
        s.close()
    deadline = time.monotonic() + 2
    while sum(_sim_running(s) for s in stack.sims) > 0:
        assert time.monotonic() < deadline, "upstream requests kept running after the client left"
        time.sleep(0.05)


def test_backend_error_is_normalised(stack: Stack) -> None:
    for sim in stack.sims:
        _post(f"http://127.0.0.1:{sim.port}/admin/faults", json.dumps({"fail_next": 1, "fail_status": 400}).encode())
    try:
        with pytest.raises(openai.BadRequestError) as info:
            stack.client().chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2)
        # The simulator answers vLLM's shape ({"type": "BadRequestError", "code": 400}); the client
        # gets OpenAI's, with the backend's message and the gateway's request id.
        assert info.value.body == {"message": "Injected failure (simulator fault, status 400).",
                                   "type": "invalid_request_error", "param": None, "code": None}
        assert info.value.response.headers["content-type"] == "application/json"
        assert info.value.response.headers.get("x-request-id")
    finally:
        for sim in stack.sims:
            _post(f"http://127.0.0.1:{sim.port}/admin/faults", json.dumps({"fail_next": 0}).encode())


def test_upstream_timeout_is_504(stack: Stack) -> None:
    for sim in stack.sims:
        _post(f"http://127.0.0.1:{sim.port}/admin/faults", json.dumps({"latency_ms": 3000}).encode())
    try:
        with pytest.raises(openai.APIStatusError) as info:
            stack.client().chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2)
        assert info.value.status_code == 504
    finally:
        for sim in stack.sims:
            _post(f"http://127.0.0.1:{sim.port}/admin/faults", json.dumps({"latency_ms": 0}).encode())


def _dead_port() -> int:
    port = free_port()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    return port


def test_no_healthy_backend_is_503_with_retry_after(tmp_path: Path) -> None:
    cfg = {"state": {"embedded_dir": str(tmp_path / "redis")},
           "backends": [{"name": "dead", "url": f"http://127.0.0.1:{_dead_port()}", "models": [MODEL]}]}
    gw = start_gateway(tmp_path, cfg)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as info:
            c.chat.completions.create(model=MODEL, messages=MSGS)
        assert info.value.status_code == 503
        assert int(info.value.response.headers["retry-after"]) >= 1
        status, _, _ = _post(f"http://127.0.0.1:{gw.port}/ready", b"")
        assert status in (404, 405)  # /ready is GET-only
    finally:
        gw.stop()


def test_unreachable_backend_fails_over(tmp_path: Path) -> None:
    sim = start_sim(tmp_path, MODEL, ["--profile", "tiny"])
    # The dead backend looks healthy until its first scrape fails; set a slow scrape to keep it so.
    cfg = {"state": {"embedded_dir": str(tmp_path / "redis")}, "server": {"debug_headers": True},
           "routing": {"scrape_interval_s": 30},
           "backends": [{"name": "dead", "url": f"http://127.0.0.1:{_dead_port()}", "models": [MODEL]},
                        {"name": "live", "url": f"http://127.0.0.1:{sim.port}", "models": [MODEL]}]}
    gw = start_gateway(tmp_path, cfg)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="x", max_retries=0)
        for _ in range(4):
            raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=MSGS, max_tokens=2)
            assert raw.headers["x-gravity-backend"] == "live"
    finally:
        gw.stop()
        sim.stop()


def test_kserve_backend_paths(tmp_path: Path) -> None:
    """A KServe backend serves OpenAI routes under /openai/v1; models are discovered there too."""
    sim = start_sim(tmp_path, MODEL, ["--profile", "tiny", "--kserve"])
    cfg = {"state": {"embedded_dir": str(tmp_path / "redis")},
           "backends": [{"name": "ks", "url": f"http://127.0.0.1:{sim.port}", "kind": "kserve"}]}
    gw = start_gateway(tmp_path, cfg)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="x", max_retries=0)
        assert [m.id for m in c.models.list()] == [MODEL]
        reply = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=3, extra_body=EOS)
        assert reply.usage is not None and reply.usage.completion_tokens == 3
    finally:
        gw.stop()
        sim.stop()


def test_trace_context_and_request_id_reach_the_backend(stack: Stack) -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    raw = stack.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=MSGS, max_tokens=2, extra_headers={"traceparent": traceparent})
    backend = next(s for i, s in enumerate(stack.sims) if raw.headers["x-gravity-backend"] == f"sim-{i}")

    async def records() -> list[dict[str, object]]:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{backend.port}/admin/requests") as r:
            return list((await r.json())["requests"])

    mine = [r for r in asyncio.run(records()) if r.get("traceparent") == traceparent]
    assert len(mine) == 1
    # One id end to end: the backend names its completion after the gateway's x-request-id.
    assert raw.headers["x-request-id"] == raw.headers.get_list("x-request-id")[0]
    assert mine[0]["request_id"] == f"chatcmpl-{raw.headers['x-request-id']}"
