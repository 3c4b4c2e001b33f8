"""The access log as an operator (and an auditor) reads it: one line per request with the gateway's
own fields, in JSON or text, and never a key or a prompt, even at debug level."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from policies.keys import hash_key
from tests.support.procs import Proc, start_gateway, start_redis, start_sim

pytestmark = pytest.mark.slow

MODEL = "sim-llama"
SECRET = "sk-gravity-SECRET-7f3a9c1e5b"
WRONG = "sk-gravity-WRONG-0d8e2b6a44"
PROMPT = "the aubergine submarine hums at midnight"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def _stack(tmp: Path, logging: dict[str, Any]) -> tuple[Proc, list[Proc]]:
    redis = start_redis(tmp)
    sim = start_sim(tmp, MODEL, ["--profile", "tiny"])
    cfg = {
        "state": {"redis_url": f"redis://127.0.0.1:{redis.port}/0"},
        "backends": [{"name": "sim-0", "url": f"http://127.0.0.1:{sim.port}", "models": [MODEL]}],
        "policies": {"auth": {"enabled": True, "keys": [
            {"name": "app", "sha256": hash_key(SECRET), "tenant": "team-log"}]}},
        "logging": logging,
        "resilience": {"drain": {"grace_s": 0}},
    }
    return start_gateway(tmp, cfg), [sim, redis]


def _client(gw: Proc, key: str = SECRET) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key=key, max_retries=0, timeout=30)


def _traffic(gw: Proc) -> dict[str, Any]:
    """A plain, a streamed, a refused (wrong key), an unparseable and a Responses request; their ids."""
    c = _client(gw)
    msgs = [{"role": "user", "content": PROMPT}]
    plain = c.chat.completions.with_raw_response.create(
        model=MODEL, messages=msgs, max_tokens=5, extra_body={"ignore_eos": True},  # type: ignore[arg-type]
        extra_headers={"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"})
    streamed = c.chat.completions.with_raw_response.create(
        model=MODEL, messages=msgs, max_tokens=6, stream=True,  # type: ignore[arg-type]
        extra_body={"ignore_eos": True})
    chunks = list(streamed.parse())
    with pytest.raises(openai.AuthenticationError) as refused:
        _client(gw, WRONG).chat.completions.create(model=MODEL, messages=msgs, max_tokens=2)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError) as bad:
        c.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=2,  # type: ignore[arg-type]
                                  extra_headers={"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"})
    responses = c.responses.with_raw_response.create(model=MODEL, input=PROMPT, max_output_tokens=4)
    time.sleep(0.3)
    return {"plain": (plain.headers["x-request-id"], plain.parse().usage),
            "streamed": (streamed.headers["x-request-id"], chunks),
            "refused": refused.value.response.headers["x-request-id"],
            "bad": bad.value.response.headers["x-request-id"],
            "responses": (responses.headers["x-request-id"], responses.parse().usage)}


def _no_secrets(log: str) -> None:
    for needle in (SECRET, WRONG, PROMPT, "aubergine", hash_key(SECRET)):
        assert needle not in log, f"{needle!r} appears in the gateway's log"


def test_json_access_lines_carry_the_fields_and_no_secrets_at_debug_level(tmp_path: Path) -> None:
    gw, others = _stack(tmp_path, {"level": "debug", "format": "json"})
    try:
        ids = _traffic(gw)
    finally:
        gw.stop()
        for p in others:
            p.stop()
    log = gw.log_path.read_text(errors="replace")
    _no_secrets(log)
    lines = [ln for ln in log.splitlines() if ln.startswith("{")]
    records = [json.loads(ln) for ln in lines]
    assert any(r["level"] == "DEBUG" for r in records), "debug level was asked for"
    access = {r["request_id"]: r for r in records if r["logger"] == "gravity.access"}
    assert len([r for r in records if r["logger"] == "gravity.access"]) == len(access) == 5, access

    rid, usage = ids["plain"]
    line = access[rid]
    assert line["tenant"] == "team-log" and line["model"] == MODEL and line["endpoint"] == "sim-0"
    assert line["status"] == 200 and line["outcome"] == "ok" and line["attempts"] == 1
    assert line["tokens_in"] == usage.prompt_tokens and line["tokens_out"] == usage.completion_tokens == 5
    assert line["tokens_cached"] is not None and line["ttft_ms"] is None and line["duration_ms"] > 0
    assert line["trace_id"] == TRACE and line["route"] == "chat/completions" and line["stream"] is False

    rid, _ = ids["streamed"]
    line = access[rid]
    assert line["stream"] is True and line["status"] == 200 and line["tokens_out"] == 6
    assert 0 < line["ttft_ms"] <= line["duration_ms"]
    assert line["trace_id"] is None  # the client sent no traceparent and tracing is off

    line = access[ids["refused"]]
    assert line["status"] == 401 and line["outcome"] == "error" and line["endpoint"] is None
    assert line["attempts"] == 0 and line["tenant"] == "default"

    line = access[ids["bad"]]  # no exchange was ever made of it: the edge's own line
    assert line["status"] == 400 and line["path"] == "/v1/chat/completions" and line["method"] == "POST"
    assert line["trace_id"] == TRACE

    rid, usage = ids["responses"]
    line = access[rid]
    assert line["status"] == 200 and line["tenant"] == "team-log" and line["tokens_out"] == usage.output_tokens


def test_text_format_and_warning_level_keep_one_access_line_per_request(tmp_path: Path) -> None:
    gw, others = _stack(tmp_path, {"level": "warning", "format": "text"})
    try:
        ids = _traffic(gw)
    finally:
        gw.stop()
        for p in others:
            p.stop()
    log = gw.log_path.read_text(errors="replace")
    _no_secrets(log)
    access = [ln for ln in log.splitlines() if " INFO gravity.access " in ln]
    assert len(access) == 5, log[-3000:]
    rid, usage = ids["plain"]
    mine = [ln for ln in access if f"request_id={rid}" in ln]
    assert len(mine) == 1
    assert f"tokens_in={usage.prompt_tokens}" in mine[0] and " status=200" in mine[0] and "tenant=team-log" in mine[0]
    # warning level: nothing else at INFO or below
    assert not [ln for ln in log.splitlines() if (" INFO " in ln or " DEBUG " in ln) and ln not in access]


def test_access_log_can_be_turned_off(tmp_path: Path) -> None:
    gw, others = _stack(tmp_path, {"access_log": False, "level": "info"})
    try:
        _client(gw).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        time.sleep(0.2)
    finally:
        gw.stop()
        for p in others:
            p.stop()
    log = gw.log_path.read_text(errors="replace")
    assert "gravity.access" not in log
    assert any(json.loads(ln)["level"] == "INFO" for ln in log.splitlines() if ln.startswith("{"))


def test_with_tracing_on_the_line_carries_the_requests_own_trace_id(tmp_path: Path) -> None:
    from tests.support.otlp_receiver import OtlpReceiver

    receiver = OtlpReceiver()
    redis = start_redis(tmp_path)
    sim = start_sim(tmp_path, MODEL, ["--profile", "tiny"])
    cfg = {"state": {"redis_url": f"redis://127.0.0.1:{redis.port}/0"},
           "backends": [{"name": "sim-0", "url": f"http://127.0.0.1:{sim.port}", "models": [MODEL]}],
           "resilience": {"drain": {"grace_s": 0}}}
    gw = start_gateway(tmp_path, cfg, env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                                           "OTEL_BSP_SCHEDULE_DELAY": "50"})
    try:
        c = _client(gw, "unused")
        plain = c.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "traced"}], max_tokens=2)
        joined = c.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "traced"}], max_tokens=2,
            extra_headers={"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"})
        servers = receiver.wait_for(lambda spans: sum(s.kind == "SERVER" for s in spans) >= 2)
        time.sleep(0.2)
    finally:
        gw.stop()
        for p in (sim, redis):
            p.stop()
        receiver.close()
    records = [json.loads(ln) for ln in gw.log_path.read_text().splitlines() if ln.startswith("{")]
    access = {r["request_id"]: r for r in records if r["logger"] == "gravity.access"}
    traces = {s.trace_id for s in servers if s.kind == "SERVER"}
    mine = access[plain.headers["x-request-id"]]["trace_id"]
    # No traceparent came in: the id is the one the gateway's own trace got, not null.
    assert mine is not None and mine in traces and mine != TRACE
    assert access[joined.headers["x-request-id"]]["trace_id"] == TRACE and TRACE in traces
