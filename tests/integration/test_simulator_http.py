"""The real simulator process (`python -m simulator`) driven by the official openai SDK."""
from __future__ import annotations

import json
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.support.procs import Proc, free_port

MESSAGES: list[Any] = [{"role": "system", "content": "You are a terse assistant. " * 8},
                       {"role": "user", "content": "Name three rivers."}]


def start(tmp: Path, *extra: str) -> Proc:
    port = free_port()
    args = [sys.executable, "-m", "simulator", "--host", "127.0.0.1", "--port", str(port), "--model", "sim-llama",
            "--profile", "tiny", *extra]
    return Proc(args, port, tmp / f"sim-{port}.log").start()


def client(proc: Proc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{proc.port}/v1", api_key="unused", max_retries=0, timeout=10)


def http(proc: Proc, path: str, body: dict[str, Any] | None = None) -> str:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{proc.port}{path}", data=data,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return str(resp.read().decode())


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    proc = start(tmp_path_factory.mktemp("sim"), "--fail-next", "1", "--fail-status", "429",
                 "--lora-modules", "sql=/adapters/sql")
    try:
        yield proc
    finally:
        proc.stop()


def test_cli_fault_fails_first_request_then_serves(sim: Proc) -> None:
    api = client(sim)
    with pytest.raises(openai.RateLimitError):
        api.chat.completions.create(model="sim-llama", messages=MESSAGES, max_tokens=2)
    done = api.chat.completions.create(model="sim-llama", messages=MESSAGES, max_tokens=6,
                                         extra_body={"ignore_eos": True})
    assert done.choices[0].message.content and done.choices[0].finish_reason == "length"
    assert done.usage is not None and done.usage.completion_tokens == 6


def test_stream_is_spread_over_time_and_repeat_prompt_hits_cache(sim: Proc) -> None:
    api = client(sim)
    messages: list[Any] = [{"role": "system", "content": "Fresh context, never sent before. " * 6},
                           *MESSAGES[1:]]
    cached = []
    for _ in range(2):
        stamps, usage, text = [], None, []
        started = time.monotonic()
        for chunk in api.chat.completions.create(model="sim-llama", messages=messages, max_tokens=40, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}):
            stamps.append(time.monotonic() - started)
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
            else:
                usage = chunk.usage
        assert usage is not None and usage.completion_tokens == 40
        assert usage.prompt_tokens_details is not None
        cached.append(usage.prompt_tokens_details.cached_tokens)
        # 40 decode steps of ~5.5 ms: the first token arrives long before the last.
        assert stamps[-1] - stamps[1] > 0.1
        assert len("".join(text).split()) >= 30
    # The chat template header may already be cached; the whole prompt (bar its tail) is on repeat.
    assert cached[1] is not None and cached[0] is not None and cached[1] > cached[0] + 32


def test_completions_lora_models_and_metrics(sim: Proc) -> None:
    api = client(sim)
    assert {(m.id, getattr(m, "parent", None)) for m in api.models.list()} == {("sim-llama", None),
                                                                               ("sql", "sim-llama")}
    out = api.completions.create(model="sql", prompt="SELECT", max_tokens=3)
    assert out.choices[0].text and out.model == "sql"
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="missing", prompt="x", max_tokens=1)
    emb = api.embeddings.create(model="sim-llama", input="hello")
    assert len(emb.data[0].embedding) == 384
    text = http(sim, "/metrics")
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:num_preemptions_total", "vllm:time_to_first_token_seconds",
                 "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds", "vllm:cache_config_info",
                 "vllm:lora_requests_info"):
        assert name in text, name


def test_traceparent_is_recorded(sim: Proc) -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    client(sim).chat.completions.create(model="sim-llama", messages=MESSAGES, max_tokens=1,
                                        extra_headers={"traceparent": tp})
    records = json.loads(http(sim, "/admin/requests"))["requests"]
    assert records[-1]["traceparent"] == tp


def test_exit_after_fault_kills_the_process_mid_stream(tmp_path: Path) -> None:
    proc = start(tmp_path)
    try:
        http(proc, "/admin/faults", {"exit_after": 3})
        got = 0
        with pytest.raises((openai.APIError, openai.APIConnectionError)):
            for chunk in client(proc).chat.completions.create(model="sim-llama", messages=MESSAGES,
                                                               max_tokens=50, stream=True,
                                                               extra_body={"ignore_eos": True}):
                got += bool(chunk.choices and chunk.choices[0].delta.content)
        assert got == 3
        assert proc.popen.wait(5) == 17
    finally:
        proc.stop()


def post_json(proc: Proc, path: str, body: dict[str, Any], timeout: float = 5.0) -> tuple[int, Any]:
    """(status, parsed JSON body) for 2xx and 4xx/5xx alike; a hang past `timeout` raises."""
    req = urllib.request.Request(f"http://127.0.0.1:{proc.port}{path}", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode(errors="replace")


def test_hostile_embedding_requests_get_400s_and_the_server_stays_up(sim: Proc) -> None:
    # A billion dimensions used to make the replica build a 1e9-float list: it stopped answering,
    # grew past 2 GB and ignored SIGTERM. A uint64 token id used to be a plain-text 500.
    for body, param in (({"input": "hello", "dimensions": 1_000_000_000}, "dimensions"),
                        ({"input": "hello", "dimensions": 385}, "dimensions"),
                        ({"input": [[18446744073709551615]]}, "input"),
                        ({"input": [[5, -1]]}, "input"),
                        ({"input": [7, 2**40]}, "input"),
                        ({"input": "word " * 5000}, "input")):
        status, err = post_json(sim, "/v1/embeddings", {"model": "sim-llama", **body})
        assert status == 400, (body, status, err)
        assert isinstance(err, dict) and err["error"]["type"] == "BadRequestError", err
        assert err["error"]["param"] == param and err["error"]["code"] == 400
    assert http(sim, "/health") == ""
    status, ok = post_json(sim, "/v1/embeddings", {"model": "sim-llama", "input": "hello", "dimensions": 64})
    assert status == 200 and len(ok["data"][0]["embedding"]) == 64


def _stream_one_chunk(proc: Proc) -> socket.socket:
    """Open a streamed chat request and read until its first SSE event: the request is in flight."""
    body = json.dumps({"model": "sim-llama", "messages": MESSAGES, "stream": True, "max_tokens": 50,
                       "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", proc.port), timeout=5)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%s" % (len(body), body))
    got = b""
    while b"data: " not in got:
        got += sock.recv(4096)
    return sock


def test_sigterm_stops_a_simulator_holding_a_stalled_stream(tmp_path: Path) -> None:
    # uvicorn's graceful shutdown waits for open responses with no deadline: a stalled stream
    # (a fault, or a client that never reads) kept a SIGTERMed replica alive for ever.
    proc = start(tmp_path, "--stall-after", "1")
    sock = _stream_one_chunk(proc)
    try:
        started = time.monotonic()
        proc.popen.send_signal(signal.SIGTERM)
        proc.popen.wait(8)
        assert time.monotonic() - started < 8
    finally:
        sock.close()
        proc.stop()


def test_sigterm_stops_a_simulator_whose_event_loop_is_busy(tmp_path: Path) -> None:
    # 60,000 embedding inputs keep the event loop computing for seconds; a SIGTERM must still stop
    # the process in bounded time even though no await gives uvicorn's shutdown a chance to run.
    proc = start(tmp_path)
    body = json.dumps({"model": "sim-llama", "input": ["x"] * 60_000}).encode()
    sock = socket.create_connection(("127.0.0.1", proc.port), timeout=5)
    try:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(1.0)
        assert proc.popen.poll() is None
        started = time.monotonic()
        proc.popen.send_signal(signal.SIGTERM)
        proc.popen.wait(10)
        assert time.monotonic() - started < 10
    finally:
        sock.close()
        proc.stop()
