"""HTTP surface in-process (uvicorn on a free port + aiohttp): wire shapes, errors, faults, admin."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import uvicorn

from simulator.faults import Faults
from simulator.profiles import get_profile
from simulator.server import SimServerConfig, create_app
from tests.support.procs import free_port

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "Tell me about the sea, please, in some detail."}]


@contextlib.asynccontextmanager
async def serve(cfg: SimServerConfig) -> AsyncIterator[aiohttp.ClientSession]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(cfg), host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False, lifespan="on"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
            yield session
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    cfg = SimServerConfig(model="m", lora_modules={"ad": "/loras/ad"})
    async with serve(cfg) as session:
        yield session


async def sse(resp: aiohttp.ClientResponse) -> list[Any]:
    out: list[Any] = []
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def test_chat_non_stream_shape_and_request_record(client: aiohttp.ClientSession) -> None:
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with client.post(CHAT, json={"model": "m", "messages": MSG, "max_tokens": 5, "ignore_eos": True},
                           headers={"traceparent": tp, "x-request-id": "abc"}) as resp:
        assert resp.status == 200 and resp.headers["x-request-id"] == "abc"
        body = await resp.json()
    assert body["id"] == "chatcmpl-abc" and body["object"] == "chat.completion" and body["model"] == "m"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"].strip()
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5 and "cached_tokens" in body["usage"]["prompt_tokens_details"]
    async with client.get("/admin/requests") as resp:
        rec = (await resp.json())["requests"][-1]
    assert rec["traceparent"] == tp and rec["request_id"] == "chatcmpl-abc" and rec["status"] == "finished"
    assert rec["prompt_tokens"] == body["usage"]["prompt_tokens"] and rec["timings"]["e2e_s"] > 0


async def test_chat_stream_with_usage_and_cached_tokens_on_repeat(client: aiohttp.ClientSession) -> None:
    req = {"model": "m", "messages": MSG, "max_tokens": 4, "stream": True, "ignore_eos": True,
           "stream_options": {"include_usage": True}}
    cached = []
    for _ in range(2):
        async with client.post(CHAT, json=req) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            chunks = await sse(resp)
        assert chunks[-1] == "[DONE]"
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert chunks[-2]["choices"] == [] and chunks[-2]["usage"]["completion_tokens"] == 4
        assert chunks[-3]["choices"][0]["finish_reason"] == "length"
        assert all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])
        cached.append(chunks[-2]["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert cached[0] == 0 and cached[1] > 0


async def test_completions_stream_and_token_prompt(client: aiohttp.ClientSession) -> None:
    async with client.post("/v1/completions", json={"model": "m", "prompt": [1, 2, 3], "max_tokens": 3, "ignore_eos": True,
                                                    "stream": True}) as resp:
        chunks = await sse(resp)
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None, None, "length"]
    assert chunks[0]["object"] == "text_completion" and "usage" not in chunks[0]
    async with client.post("/v1/completions", json={"model": "ad", "prompt": "Once upon", "ignore_eos": True}) as resp:
        body = await resp.json()
    assert body["model"] == "ad" and body["usage"]["completion_tokens"] == 16  # vLLM's default


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    (CHAT, {"model": "nope", "messages": MSG}, 404, "model"),
    (CHAT, {"model": "m", "messages": MSG, "n": 2}, 400, "n"),
    (CHAT, {"model": "m", "messages": MSG, "priority": 1}, 400, "priority"),
    (CHAT, {"model": "m", "messages": []}, 400, "messages"),
    (CHAT, {"model": "m", "messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
    (CHAT, {"model": "m", "messages": MSG, "max_tokens": 5000}, 400, "max_tokens"),
    (CHAT, {"model": "m", "messages": MSG, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (CHAT, {"model": "m", "messages": MSG, "continue_final_message": True}, 400, "messages"),
    (CHAT, {"model": "m", "messages": MSG, "cache_salt": ""}, 400, "cache_salt"),
    ("/v1/completions", {"model": "m", "prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/embeddings", {"model": "m", "input": 3}, 400, "input"),
    ("/v1/embeddings", {"model": "m", "input": [[18446744073709551615]]}, 400, "input"),
    ("/v1/embeddings", {"model": "m", "input": "hi", "dimensions": 0}, 400, "dimensions"),
    ("/v1/embeddings", {"model": "m", "input": "hi", "dimensions": 10**9}, 400, "dimensions"),
    ("/v1/completions", {"model": "m", "prompt": [1, 18446744073709551615]}, 400, "prompt"),
    ("/v1/completions", {"model": "m", "prompt": [-3]}, 400, "prompt"),
])
async def test_bad_requests_get_vllm_error_bodies(client: aiohttp.ClientSession, path: str, body: dict[str, Any],
                                                  status: int, param: str) -> None:
    async with client.post(path, json=body) as resp:
        assert resp.status == status
        err = (await resp.json())["error"]
    assert err["code"] == status and err["param"] == param and err["message"]
    assert err["type"] == ("NotFoundError" if status == 404 else "BadRequestError")


async def test_invalid_json_is_a_400(client: aiohttp.ClientSession) -> None:
    async with client.post(CHAT, data=b"{nope", headers={"content-type": "application/json"}) as resp:
        assert resp.status == 400 and (await resp.json())["error"]["type"] == "BadRequestError"


async def test_embeddings_are_deterministic_unit_vectors(client: aiohttp.ClientSession) -> None:
    async with client.post("/v1/embeddings", json={"model": "m", "input": ["hello", "world"]}) as resp:
        a = await resp.json()
    async with client.post("/v1/embeddings", json={"model": "m", "input": "hello",
                                                   "encoding_format": "base64"}) as resp:
        b = await resp.json()
    v0 = a["data"][0]["embedding"]
    assert len(v0) == 384 and abs(sum(x * x for x in v0) - 1) < 1e-6 and v0 != a["data"][1]["embedding"]
    import struct
    decoded = struct.unpack("<384f", base64.b64decode(b["data"][0]["embedding"]))
    assert decoded == pytest.approx(v0, abs=1e-6)


async def test_models_tokenize_detokenize(client: aiohttp.ClientSession) -> None:
    async with client.get("/v1/models") as resp:
        data = (await resp.json())["data"]
    assert [(d["id"], d["parent"]) for d in data] == [("m", None), ("ad", "m")] and data[1]["root"] == "/loras/ad"
    async with client.post("/tokenize", json={"model": "m", "prompt": "hello world"}) as resp:
        tok = await resp.json()
    assert tok["count"] == len(tok["tokens"]) == 2 and tok["max_model_len"] == 4096
    async with client.post("/detokenize", json={"model": "m", "tokens": tok["tokens"]}) as resp:
        assert (await resp.json())["prompt"] == "hello world"
    async with client.get("/health") as resp:
        assert resp.status == 200


async def test_render_gives_the_token_ids_the_engine_will_prefill(client: aiohttp.ClientSession) -> None:
    # vllm-router's cache_aware renders each request on a worker; the ids must be the prompt the
    # engine caches, so a repeat of the request hits exactly that many tokens.
    body = {"model": "m", "messages": MSG, "max_tokens": 3, "cache_salt": "s1"}
    async with client.post("/v1/chat/completions/render", json=body) as resp:
        assert resp.status == 200
        rendered = await resp.json()
    async with client.post("/tokenize", json={"model": "m", "messages": MSG}) as resp:
        assert rendered["token_ids"] == (await resp.json())["tokens"]
    assert rendered["sampling_params"]["max_tokens"] == 3 and rendered["cache_salt"] == "s1"
    assert rendered["model"] == "m" and rendered["stream"] is False and rendered["features"] is None
    for _ in range(2):
        async with client.post(CHAT, json=body) as resp:
            use = (await resp.json())["usage"]
    assert use["prompt_tokens"] == len(rendered["token_ids"])
    async with client.post("/v1/completions/render", json={"model": "m", "prompt": "hello world"}) as resp:
        listed = await resp.json()
    assert isinstance(listed, list) and len(listed) == 1 and len(listed[0]["token_ids"]) == 2
    async with client.post("/v1/chat/completions/render", json={"model": "nope", "messages": MSG}) as resp:
        assert resp.status == 404 and (await resp.json())["error"]["param"] == "model"


async def test_admin_calls_counts_each_route_a_router_asks(client: aiohttp.ClientSession) -> None:
    # The head-to-head harness tells from these counts whether a router renders or tokenizes on
    # the workers, and how often per request.
    body = {"model": "m", "messages": MSG, "max_tokens": 2}
    for _ in range(3):
        async with client.post("/v1/chat/completions/render", json=body) as resp:
            assert resp.status == 200
    async with client.post("/tokenize", json={"model": "m", "prompt": "hi"}) as resp:
        assert resp.status == 200
    async with client.post(CHAT, json=body) as resp:
        assert resp.status == 200
    async with client.get("/admin/calls") as resp:
        calls = await resp.json()
    assert calls["/v1/chat/completions/render"] == 3 and calls["/tokenize"] == 1
    assert calls["/v1/chat/completions"] == 1 and "/v1/completions/render" not in calls


async def test_admin_runner_reports_keep_up(client: aiohttp.ClientSession) -> None:
    async with client.post(CHAT, json={"model": "m", "messages": MSG, "max_tokens": 20, "ignore_eos": True}) as resp:
        assert resp.status == 200
    async with client.get("/admin/runner") as resp:
        r = await resp.json()
    assert r["steps"] >= 20 and r["engine_busy_s"] > 0.05 and r["wall_busy_s"] > 0
    assert r["keep_up"] == pytest.approx(r["engine_busy_s"] / (r["wall_busy_s"] * r["time_scale"]))


async def test_metrics_use_vllm_names(client: aiohttp.ClientSession) -> None:
    async with client.post(CHAT, json={"model": "ad", "messages": MSG, "max_tokens": 2, "ignore_eos": True}) as resp:
        assert resp.status == 200
    async with client.get("/metrics") as resp:
        text = await resp.text()
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:num_preemptions_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_count", "vllm:cache_config_info", "vllm:lora_requests_info"):
        assert name in text, name
    assert 'vllm:generation_tokens_total{engine="0",model_name="m"} 2.0' in text
    assert 'max_lora="1"' in text


async def test_fail_next_and_latency_faults(client: aiohttp.ClientSession) -> None:
    async with client.post("/admin/faults", json={"fail_next": 2, "fail_status": 503}) as resp:
        assert (await resp.json())["fail_next"] == 2
    for _ in range(2):
        async with client.post(CHAT, json={"model": "m", "messages": MSG, "max_tokens": 1}) as resp:
            assert resp.status == 503 and resp.headers["retry-after"] == "1"
    async with client.post("/admin/faults", json={"latency_ms": 200}) as resp:
        assert resp.status == 200
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with client.post(CHAT, json={"model": "m", "messages": MSG, "max_tokens": 1}) as resp:
        assert resp.status == 200
    assert loop.time() - started >= 0.2
    async with client.delete("/admin/faults") as resp:
        assert (await resp.json()) == Faults().to_dict()
    async with client.post("/admin/faults", json={"bogus": 1}) as resp:
        assert resp.status == 400


async def test_stall_holds_the_stream_open_and_disconnect_frees_it(client: aiohttp.ClientSession) -> None:
    await (await client.post("/admin/faults", json={"stall_after": 2})).release()
    resp = await client.post(CHAT, json={"model": "m", "messages": MSG, "max_tokens": 50, "stream": True,
                                           "ignore_eos": True})
    got = []
    with pytest.raises(asyncio.TimeoutError):
        async with asyncio.timeout(0.5):
            async for raw in resp.content:
                if raw.startswith(b"data: "):
                    got.append(raw)
    assert len(got) == 3  # role chunk + 2 tokens
    resp.close()
    async with client.get("/metrics") as m:
        assert 'vllm:num_requests_running{engine="0",model_name="m"} 0.0' in await m.text()


async def test_reset_moves_process_start_time_and_empties_cache(client: aiohttp.ClientSession) -> None:
    req = {"model": "m", "messages": MSG, "max_tokens": 1}
    await (await client.post(CHAT, json=req)).release()
    async with client.post("/admin/reset") as resp:
        assert (await resp.json())["restarts"] == 1
    async with client.get("/metrics") as resp:
        assert "gravity_sim_restarts_total 1.0" in await resp.text()
    async with client.post(CHAT, json=req) as resp:
        assert (await resp.json())["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


async def test_priority_is_accepted_when_enabled() -> None:
    cfg = SimServerConfig(model="m", engine=get_profile("tiny", scheduling_policy="priority"))
    async with serve(cfg) as session, session.post(CHAT, json={"messages": MSG, "max_tokens": 1,
                                                               "priority": -5}) as resp:
        assert resp.status == 200


async def test_non_stream_client_disconnect_frees_the_sequence(client: aiohttp.ClientSession) -> None:
    body = {"model": "m", "messages": MSG, "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(asyncio.TimeoutError):
        async with asyncio.timeout(0.2):
            await client.post(CHAT, json=body)
    for _ in range(50):
        async with client.get("/metrics") as m:
            if 'vllm:num_requests_running{engine="0",model_name="m"} 0.0' in await m.text():
                break
        await asyncio.sleep(0.02)
    else:
        pytest.fail("the sequence kept running after the client left")
    async with client.get("/admin/requests") as resp:
        assert (await resp.json())["requests"][-1]["status"] == "client_disconnected"
