"""The gateway's edges as a hostile client or an odd backend finds them (issue 9, items 2, 8-11, 13, 16).

Real processes: a stub OpenAI backend (tests/support/stub_backend.py), simulators, redis-server and
the gateway; the openai SDK or raw aiohttp as the client.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.support.procs import Proc, free_port, start_gateway, start_redis, start_sim

pytestmark = [pytest.mark.slow, pytest.mark.both_stacks]


def start_stub(tmp: Path, mode: str) -> Proc:
    port = free_port()
    args = [sys.executable, "-m", "tests.support.stub_backend", "--port", str(port), "--mode", mode]
    return Proc(args, port, tmp / f"stub-{mode}-{port}.log").start()


@contextlib.contextmanager
def stub_stack(tmp: Path, mode: str, server: dict[str, Any] | None = None) -> Iterator[tuple[Proc, Proc]]:
    redis = start_redis(tmp)
    stub = start_stub(tmp, mode)
    gw = None
    try:
        cfg = {"server": {"debug_headers": True, **(server or {})},
               "backends": [{"name": "up", "url": f"http://127.0.0.1:{stub.port}", "kind": "openai",
                             "models": ["stub-model"], "api_key": "sk-upstream-secret"}],
               "state": {"redis_url": f"redis://127.0.0.1:{redis.port}/0"}}
        gw = start_gateway(tmp, cfg)
        yield gw, stub
    finally:
        for p in (gw, stub, redis):
            if p is not None:
                p.stop()


def _client(gw: Proc, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="unused", max_retries=0, **kw)


def _recorded(stub: Proc) -> list[dict[str, Any]]:
    async def go() -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{stub.port}/admin/requests") as r:
            return list((await r.json())["requests"])
    return asyncio.run(go())


MESSAGES = [{"role": "user", "content": "hi"}]


# -- item 8: compressed answers ---------------------------------------------------------------
@pytest.mark.parametrize("mode", ["gzip", "gzip-always"])
def test_compressing_backend_reaches_the_client_decoded(tmp_path: Path, mode: str) -> None:
    with stub_stack(tmp_path, mode) as (gw, stub):
        client = _client(gw)
        reply = client.chat.completions.create(model="stub-model", messages=MESSAGES)  # type: ignore[arg-type]
        assert reply.choices[0].message.content == "hello from the stub"
        assert reply.usage is not None and reply.usage.total_tokens == 11
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="stub-model", messages=MESSAGES, stream=True) if c.choices)  # type: ignore[arg-type]
        assert text == "hello from the stub"
        # The gateway asks for identity, so a backend that honours Accept-Encoding never compresses.
        if mode == "gzip":
            for rec in _recorded(stub):
                assert rec["headers"].get("Accept-Encoding", "identity") == "identity", rec["headers"]


# -- item 10: upstream auth failures and odd error bodies -----------------------------------------
@pytest.mark.parametrize("mode,upstream", [("auth-401", 401), ("auth-403", 403)])
def test_backend_auth_failure_is_a_502_not_the_clients_fault(tmp_path: Path, mode: str, upstream: int) -> None:
    with stub_stack(tmp_path, mode) as (gw, _stub):
        with pytest.raises(openai.APIStatusError) as info:
            _client(gw).chat.completions.create(model="stub-model", messages=MESSAGES)  # type: ignore[arg-type]
        assert not isinstance(info.value, (openai.AuthenticationError, openai.PermissionDeniedError))
        assert info.value.status_code == 502
        err: Any = info.value.body  # the SDK unwraps {"error": ...}
        assert err["code"] == "upstream_auth_error" and err["type"] == "server_error"
        assert "sk-up" not in json.dumps(err), "the backend's key hint must not reach the client"
        log = gw.log()
        assert f"HTTP {upstream}" in log and "operator" in log.lower()


def test_backend_error_types_are_normalised_and_retry_after_kept(tmp_path: Path) -> None:
    with stub_stack(tmp_path, "error-odd") as (gw, _stub):
        with pytest.raises(openai.APIStatusError) as info:
            _client(gw).chat.completions.create(model="stub-model", messages=MESSAGES)  # type: ignore[arg-type]
        assert info.value.status_code == 503
        err: Any = info.value.body  # the SDK unwraps {"error": ...}
        assert err["type"] == "server_error", err
        assert err["message"] == "engine overloaded"
        assert not isinstance(err["code"], int)
        assert info.value.response.headers["retry-after"] == "7"


# -- items 2 and 11: what is forwarded upstream -----------------------------------------------------
def test_hop_by_hop_spoofed_and_destination_headers_are_not_forwarded(tmp_path: Path) -> None:
    with stub_stack(tmp_path, "plain") as (gw, stub):
        async def go() -> tuple[int, dict[str, str]]:
            headers = {"Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1", "Cookie": "session=abc",
                       "Forwarded": "for=6.6.6.6", "X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https",
                       "X-Forwarded-Host": "evil.example", "X-Real-IP": "6.6.6.6",
                       "x-gateway-destination-endpoint": "10.9.9.9:80",
                       "x-gateway-destination-endpoint-subset": "10.9.9.9:80",
                       "x-gateway-destination-endpoint-served": "10.9.9.9:80",
                       "TE": "trailers", "Proxy-Authorization": "Basic eA==", "X-Keep-Me": "yes"}
            async with aiohttp.ClientSession() as s, s.post(
                    f"http://127.0.0.1:{gw.port}/v1/chat/completions", headers=headers,
                    json={"model": "stub-model", "messages": MESSAGES}) as r:
                await r.read()
                return r.status, dict(r.headers)
        status, _ = asyncio.run(go())
        assert status == 200
        got = {k.lower(): v for k, v in _recorded(stub)[-1]["headers"].items()}
        for name in ("x-secret-hop", "cookie", "forwarded", "x-forwarded-host", "x-real-ip", "te",
                     "proxy-authorization", "x-gateway-destination-endpoint",
                     "x-gateway-destination-endpoint-subset", "x-gateway-destination-endpoint-served"):
            assert name not in got, (name, got)
        assert got["x-forwarded-for"] == "127.0.0.1"
        assert got["x-forwarded-proto"] == "http"
        assert got["x-keep-me"] == "yes"
        assert got["authorization"] == "Bearer sk-upstream-secret"


def test_a_repeated_client_request_id_is_echoed_but_never_sent_upstream(tmp_path: Path) -> None:
    with stub_stack(tmp_path, "plain") as (gw, stub):
        client = _client(gw, default_headers={"x-request-id": "dup-1"})
        for _ in range(3):
            raw = client.chat.completions.with_raw_response.create(model="stub-model", messages=MESSAGES)  # type: ignore[arg-type]
            assert raw.headers["x-request-id"] == "dup-1"
        upstream_ids = [{k.lower(): v for k, v in r["headers"].items()}.get("x-request-id")
                        for r in _recorded(stub)]
        assert len(upstream_ids) == 3 and len(set(upstream_ids)) == 3, upstream_ids
        assert "dup-1" not in upstream_ids


# -- item 9: nesting -------------------------------------------------------------------------------
def _nested(depth: int) -> str:
    """`depth` nested arrays as JSON text (json.dumps itself stops near 1,000 levels)."""
    return "[" * depth + "1" + "]" * depth


@pytest.fixture(scope="module")
def sim_stack(tmp_path_factory: pytest.TempPathFactory, gateway_stack: str) -> Iterator[Proc]:
    tmp = tmp_path_factory.mktemp("edges")
    redis = start_redis(tmp)
    sim = start_sim(tmp, extra=["--profile", "tiny"])
    cfg = {"backends": [{"name": "sim-0", "url": f"http://127.0.0.1:{sim.port}", "models": ["sim-llama"]}],
           "state": {"redis_url": f"redis://127.0.0.1:{redis.port}/0"}}
    gw = start_gateway(tmp, cfg)
    try:
        yield gw
    finally:
        for p in (gw, sim, redis):
            p.stop()


def _post_raw(gw: Proc, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    async def go() -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{gw.port}{path}", data=body,
                                                        headers={"content-type": "application/json"}) as r:
            text = await r.text()
            try:
                return r.status, json.loads(text)
            except json.JSONDecodeError:
                return r.status, {"text": text}
    return asyncio.run(go())


_MSG = json.dumps(MESSAGES)


@pytest.mark.parametrize("depth", [100, 260, 600, 1000, 1100])
@pytest.mark.parametrize("path,make", [
    ("/v1/chat/completions", lambda d: f'{{"model": "sim-llama", "messages": {_MSG}, "stream": true, "x": {_nested(d)}}}'),
    ("/v1/completions", lambda d: f'{{"model": "sim-llama", "prompt": {_nested(d)}, "max_tokens": 2}}'),
    ("/v1/embeddings", lambda d: f'{{"model": "sim-llama", "input": {_nested(d)}}}'),
    ("/v1/responses", lambda d: '{"model": "sim-llama", "input": "hi", "tools": [{"type": "function", "name": "f", '
                                f'"parameters": {{"type": "object", "x": {_nested(d)}}}}}]}}'),
])
def test_deep_nesting_is_a_400_at_parse_time(sim_stack: Proc, path: str, make: Any, depth: int) -> None:
    status, body = _post_raw(sim_stack, path, make(depth).encode())
    assert status == 400, (status, body)
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "nesting_too_deep", body


def test_moderate_nesting_still_passes(sim_stack: Proc) -> None:
    body = {"model": "sim-llama", "messages": MESSAGES, "max_tokens": 2, "stream": True,
            "response_format": {"type": "json_object"}, "x_meta": json.loads(_nested(20))}
    status, _ = _post_raw(sim_stack, "/v1/chat/completions", json.dumps(body).encode())
    assert status == 200


# -- item 16: the in-flight gauge ---------------------------------------------------------------------
def _gauge(gw: Proc) -> float:
    async def go() -> str:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{gw.port}/metrics") as r:
            return await r.text()
    for line in asyncio.run(go()).splitlines():
        if line.startswith("gravity_requests_in_flight "):
            return float(line.split()[1])
    raise AssertionError("gravity_requests_in_flight missing")


def test_in_flight_gauge_follows_open_requests(sim_stack: Proc) -> None:
    async def go() -> list[float]:
        seen = []
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{sim_stack.port}/v1", api_key="x", max_retries=0)
        streams = [await client.chat.completions.create(
            model="sim-llama", messages=MESSAGES, stream=True, max_tokens=40,  # type: ignore[arg-type]
            extra_body={"ignore_eos": True}) for _ in range(3)]
        for s in streams:
            async for _ in s:
                break
        seen.append(await asyncio.to_thread(_gauge, sim_stack))
        for s in streams:
            async for _ in s:
                pass
        await client.close()
        await asyncio.sleep(0.2)
        seen.append(await asyncio.to_thread(_gauge, sim_stack))
        return seen
    during, after = asyncio.run(go())
    assert during == 3.0
    assert after == 0.0


# -- item 13: an outage logs one line per kind, not a traceback per request --------------------------
def test_outage_logs_are_short_warnings(tmp_path: Path) -> None:
    dead = free_port()
    redis = start_redis(tmp_path)
    cfg = {"backends": [{"name": "gone", "url": f"http://127.0.0.1:{dead}", "models": ["m"]}],
           "state": {"redis_url": f"redis://127.0.0.1:{redis.port}/0"}}
    gw = start_gateway(tmp_path, cfg)
    try:
        client = _client(gw)
        for _ in range(40):
            with pytest.raises(openai.APIStatusError) as info:
                client.chat.completions.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]
            assert info.value.status_code == 503
        time.sleep(0.3)
        # The whole log less the access log's one line per request (40 of them, as it should be).
        lines = [ln for ln in gw.log_path.read_text(errors="replace").splitlines() if "gravity.access" not in ln]
        log = "\n".join(lines)
        assert "Traceback" not in log, log[-2000:]
        assert len([ln for ln in lines if "ERROR" in ln]) == 0, log[-2000:]
        assert len(lines) < 20, log[-2000:]
    finally:
        gw.stop()
        redis.stop()
