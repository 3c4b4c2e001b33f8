"""docker-compose.yml in real containers: health, the README's SDK snippet, restarts, a replica
killed, rate limits across two gateway containers, Prometheus scraping, the dashboard's queries.

Tests run in file order against one stack (tests/compose/conftest.py); each leaves it whole.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.compose import harness
from tests.compose.conftest import Stack

REPO = Path(__file__).resolve().parents[2]
MODEL = "sim-llama"
METERED = "sim-llama-metered"
METERED_RPM = 12  # config/compose.yaml: policies.tenants.default.models.sim-llama-metered.rpm
SERVICES = harness.CORE_SERVICES + harness.RUN_OBSERVABILITY
DASHBOARD = REPO / "config" / "observability" / "grafana" / "dashboards" / "gravity.json"


def test_every_service_is_up_and_healthy(stack: Stack) -> None:
    for service in SERVICES:
        name = stack.container(service)
        assert harness.state(name) == "running", service
        if harness.has_healthcheck(name):
            # The container's own check, run now (podman has no systemd timer here to run it).
            assert harness.podman("healthcheck", "run", name, check=False).returncode == 0, service
            assert harness.health(name) == "healthy", service
    # Only the services meant to be reached from the host publish a port, on loopback only.
    for service in SERVICES:
        ports = json.loads(harness.podman("inspect", "--format", "{{json .NetworkSettings.Ports}}",
                                          stack.container(service)).stdout) or {}
        bound = [b for binds in ports.values() for b in (binds or [])]
        if service in stack.ports:
            assert bound and all(b["HostIp"] == "127.0.0.1" for b in bound), (service, ports)
            assert {int(b["HostPort"]) for b in bound} == {stack.ports[service]}
        else:
            assert bound == [], (service, ports)
    # Both gateway containers run as the image's non-root user.
    for service in ("gateway", "gateway-b"):
        uid = harness.podman("exec", stack.container(service), "id", "-u").stdout.strip()
        assert uid != "0"


def _readme_snippet() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Use it from the OpenAI SDK", 1)[1]
    m = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert m, "README lost its SDK snippet"
    return m.group(1)


@pytest.mark.parametrize("service", ["gateway", "gateway-b"])
def test_readme_sdk_snippet_against_the_published_port(stack: Stack, service: str) -> None:
    snippet = _readme_snippet()
    assert "http://127.0.0.1:8080/v1" in snippet
    code = snippet.replace("http://127.0.0.1:8080/v1", stack.url(service) + "/v1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    chat_line, streamed = out.stdout.split("\n", 1)
    assert chat_line.strip() and streamed.strip()  # one reply printed, then the streamed text

    c = stack.client(service)
    assert {m.id for m in c.models.list()} == {MODEL, METERED}
    chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "count"}],
                                            stream=True, max_tokens=12,
                                            extra_body={"ignore_eos": True}))
    assert sum(len(ch.choices[0].delta.content or "") > 0 for ch in chunks if ch.choices) >= 2
    assert chunks[-1].choices and chunks[-1].choices[0].finish_reason == "length"


def _turn(c: openai.OpenAI, text: str, previous: str | None) -> Any:
    return c.responses.create(model=MODEL, input=text, max_output_tokens=8, previous_response_id=previous)


def _history_ok(c: openai.OpenAI, response_id: str, turns: list[Any]) -> None:
    """The stored response is intact, and continuing it replays the whole chain to the backend."""
    got = c.responses.retrieve(response_id)
    assert got.output_text == turns[-1].output_text
    nxt = _turn(c, "Still there?", response_id)
    assert nxt.previous_response_id == response_id
    # The backend was sent the whole chain: the last turn's prompt and its answer, then the new input.
    last = turns[-1].usage
    assert nxt.usage is not None and nxt.usage.input_tokens > last.input_tokens + last.output_tokens
    turns.append(nxt)


def test_conversation_survives_gateway_restart_then_redis_restart(stack: Stack) -> None:
    c, other = stack.client("gateway"), stack.client("gateway-b")
    turns = [_turn(c, "My name is Ada. Remember it.", None)]
    turns.append(_turn(c, "What is my name?", turns[0].id))

    took = stack.restart("gateway")
    stack.wait_ready("gateway")
    _history_ok(c, turns[-1].id, turns)       # the restarted gateway reads it back from Redis
    _history_ok(other, turns[-1].id, turns)   # and so does the other replica

    took_redis = stack.restart("redis")
    stack.wait_ready("gateway")
    # Right after Redis came back, with the gateways' old connections gone.
    _history_ok(c, turns[-1].id, turns)
    _history_ok(other, turns[-1].id, turns)
    items = c.responses.input_items.list(turns[-1].id)
    assert [i.content[0].text for i in items.data] == ["Still there?"]  # type: ignore[union-attr,index]
    print(f"gateway restart {took:.1f} s, redis restart {took_redis:.1f} s")


def test_rate_limit_holds_across_both_gateway_containers(stack: Stack) -> None:
    clients = [stack.client("gateway"), stack.client("gateway-b")]
    outcome: dict[int, list[int]] = {0: [], 1: []}
    retry_after: list[str] = []
    started = time.monotonic()
    for i in range(2 * METERED_RPM):
        which = i % 2
        try:
            clients[which].chat.completions.create(model=METERED, max_tokens=1,
                                                   messages=[{"role": "user", "content": f"ping {i}"}])
            outcome[which].append(200)
        except openai.RateLimitError as exc:
            outcome[which].append(429)
            retry_after.append(exc.response.headers.get("retry-after", ""))
    elapsed = time.monotonic() - started
    admitted = sum(s == 200 for s in outcome[0] + outcome[1])
    # One budget of METERED_RPM in Redis, refilled at rpm/60 per second while the loop ran.
    refill = int(elapsed * METERED_RPM / 60) + 1
    assert METERED_RPM <= admitted <= METERED_RPM + refill, (outcome, elapsed)
    # Per-process limits would have let each gateway admit the whole budget on its own.
    assert all(429 in outcome[w] and 200 in outcome[w] for w in (0, 1)), outcome
    assert retry_after and all(v.isdigit() and int(v) >= 1 for v in retry_after)
    # The unmetered name on the same simulators is unaffected.
    assert clients[1].chat.completions.create(model=MODEL, max_tokens=1,
                                              messages=[{"role": "user", "content": "free"}]).choices


def _load(stack: Stack, stop: threading.Event, results: list[tuple[str, float, str | None]]) -> None:
    """Alternating streamed and plain requests on the first gateway until `stop`; each outcome."""
    c = stack.client("gateway")
    i = 0
    while not stop.is_set():
        i += 1
        t = time.monotonic()
        kind = "stream" if i % 2 else "plain"
        try:
            if kind == "stream":
                chunks = list(c.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"load {i}"}], max_tokens=24,
                    stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
                usage = chunks[-1].usage
                assert usage is not None and usage.completion_tokens == 24, "short stream"
            else:
                c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"load {i}"}],
                                          max_tokens=8)
            results.append((kind, t, None))
        except Exception as exc:  # noqa: BLE001 - every failure is an outcome to count
            results.append((kind, t, f"{type(exc).__name__}: {exc}"[:200]))


def test_one_simulator_killed_requests_keep_succeeding(stack: Stack) -> None:
    stop = threading.Event()
    results: list[tuple[str, float, str | None]] = []
    workers = [threading.Thread(target=_load, args=(stack, stop, results)) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        time.sleep(3)
        killed_at = time.monotonic()
        harness.podman("kill", stack.container("vllm-1"))
        time.sleep(8)
        # Still down while the load ran (no restart policy brought it back behind the test's back).
        assert harness.state(stack.container("vllm-1")) == "exited"
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=60)
    before = [r for r in results if r[1] < killed_at - 1]
    after = [r for r in results if r[1] > killed_at + 1]
    around = [r for r in results if killed_at - 1 <= r[1] <= killed_at + 1]
    assert before and after and all(r[2] is None for r in before), before
    # Requests that start after the replica is gone never reach it: strict already.
    assert [r for r in after if r[2] is not None] == []
    # Requests in flight on vllm-1 when it died fail over before the first byte or resume
    # mid-stream on another replica (docs/resilience.md): none fails, every stream is full length.
    failed = [r for r in around if r[2] is not None]
    assert failed == [], failed
    print(f"kill: {len(before)} ok before, {len(around)} around ({len(failed)} failed: {failed}), "
          f"{len(after)} ok after")

    harness.podman("start", stack.container("vllm-1"))
    harness.wait_healthy("vllm-1")
    stack.wait_ready("gateway")


def _prom(stack: Stack, path: str, **params: str) -> Any:
    query = ("?" + urllib.parse.urlencode(params)) if params else ""
    body = stack.get_json("prometheus", path + query)
    assert isinstance(body, dict) and body["status"] == "success", body
    return body["data"]


def _wait_targets_up(stack: Stack, timeout: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        targets = _prom(stack, "/api/v1/targets")["activeTargets"]
        if len(targets) == 5 and all(t["health"] == "up" for t in targets):
            return list(targets)
        if time.monotonic() > deadline:
            pytest.fail(f"targets not all up: {[(t['scrapeUrl'], t['health'], t['lastError']) for t in targets]}")
        time.sleep(1)


def test_prometheus_scrapes_both_gateways_and_every_simulator(stack: Stack) -> None:
    targets = _wait_targets_up(stack)
    assert {t["scrapeUrl"] for t in targets} == {
        "http://gateway:8080/metrics", "http://gateway-b:8080/metrics",
        "http://vllm-0:9001/metrics", "http://vllm-1:9002/metrics", "http://vllm-2:9003/metrics"}
    # What the tests above sent is in Prometheus, per gateway and per engine. vllm-1 restarted
    # (counters from zero), so every backend is asked only for a series, not a value.
    deadline = time.monotonic() + 30
    while True:
        per_gw = {r["metric"]["gateway"]: float(r["value"][1]) for r in
                  _prom(stack, "/api/v1/query", query="sum by (gateway) (gravity_requests_total)")["result"]}
        engines = {r["metric"]["backend"] for r in
                   _prom(stack, "/api/v1/query", query="vllm:prompt_tokens_total")["result"]}
        if set(per_gw) == {"gateway", "gateway-b"} and min(per_gw.values()) > 0 and \
                engines == {"vllm-0", "vllm-1", "vllm-2"}:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"gateway series {per_gw}, engine series {engines}")
        time.sleep(1)


def _metric_names(expr: str) -> set[str]:
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*(?=\s*[{\[])", expr))
    return words - {"by", "without", "rate", "sum", "max", "histogram_quantile"}


def test_dashboard_queries_evaluate_on_the_real_prometheus(stack: Stack) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 9
    _wait_targets_up(stack)
    known = set(_prom(stack, "/api/v1/label/__name__/values"))
    referenced = set().union(*(_metric_names(e) for e in exprs))
    # Every series a panel reads exists after the traffic above (a renamed metric shows up here).
    assert referenced <= known, sorted(referenced - known)
    empty = []
    for expr in exprs:
        data = _prom(stack, "/api/v1/query", query=expr)  # a PromQL error fails here
        if not data["result"]:
            empty.append(expr)
    # Rates over a quiet minute may be empty; the totals behind them are not.
    for name in referenced:
        assert _prom(stack, "/api/v1/query", query=f"count({name})")["result"], name
    print(f"{len(exprs)} panel queries, {len(empty)} empty right now: {empty}")
