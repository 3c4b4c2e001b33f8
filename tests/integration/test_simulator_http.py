"""The real simulator process (`python -m simulator`) driven by the official openai SDK."""
from __future__ import annotations

import json
import sys
import time
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
