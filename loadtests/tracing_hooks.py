"""The tracing hooks of one non-streamed chat request at 100% sampling, in process, without the gateway.

    .venv/bin/python loadtests/tracing_hooks.py   # function calls and µs per request

The hooks run as the request path calls them (gateway/app.py, pipeline.py, dispatcher.py, relay.py,
logs.py) on the objects a real request has (one Exchange, reused: its making is not tracing's): the SERVER span and its request attributes, the auth,
rate-limit and route children, one CLIENT attempt that reads the answer of loadtests/harness.py, the
outcome, and the span bytes queued for export (the export itself is not run: `bench_tracing.py
--instructions` counts it with the rest of the gateway). The count of function calls
(cProfile) does not move with the neighbours and tracks the instructions here (the hooks are many
small calls); the time is the best of several rounds. It is the quick figure to compare changes to
gateway/telemetry/ by; `bench_tracing.py --instructions` is the whole gateway's.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import COMPLETION, MODEL, REQUEST

from gateway.config import parse_config
from gateway.core import build_core
from gateway.openai_requests import parse_body
from gateway.telemetry import names as N
from gateway.telemetry.context import current_trace_id
from gateway.upstream import BackendTarget
from routing.types import Candidate, Decision


def _setup() -> Any:
    cfg = parse_config({
        "backends": [{"name": "nginx-0", "url": "http://127.0.0.1:9", "kind": "vllm", "models": [MODEL]}],
        "telemetry": {"endpoint": "http://127.0.0.1:9/v1/traces"}})
    core = build_core(cfg)
    tracing = core.tracing
    assert tracing.enabled
    target = BackendTarget.from_config(cfg.backends[0])
    key = core.admission.auth.anonymous
    payload = orjson.loads(COMPLETION)
    scores = {"prefix": 0.0, "load": 0.93, "queue": 1.0, "kv-cache": 0.88}
    decision = Decision(model=MODEL, profile="default", latency_s=2.1e-5, weights=tuple((k, 1.0) for k in scores),
                        ranked=[Candidate("nginx-0", "http://127.0.0.1:9", 2.81, scores, uncached_tokens=11)])
    processor = tracing.processor
    queue = processor._queue
    ex = core.pipeline.exchange("chat/completions", parse_body("chat/completions", REQUEST), REQUEST, {}, "r", {})

    def one(i: int) -> None:
        rid = f"req-{i:08x}"
        scope: dict[str, Any] = {
            "type": "http", "method": "POST", "path": "/v1/chat/completions", "scheme": "http",
            "client": ("127.0.0.1", 50000 + i % 1000), "state": {"request_id": rid},
            "headers": [(b"host", b"127.0.0.1:8080"), (b"content-type", b"application/json"),
                        (b"content-length", b"160")]}
        ex.request_id = rid
        with tracing.server(scope, scope["path"]):
            with tracing.span(N.SPAN_AUTH) as span:
                tracing.authenticated(span, ex, key)
            with tracing.span(N.SPAN_RATE_LIMIT) as span:
                tracing.reserved(span, ex)
            with tracing.span(N.SPAN_ROUTE) as span:
                ex.decision = decision
                tracing.routed(span, ex)
            ex.backend = "nginx-0"
            ex.attempts = 1
            headers: dict[str, str] = {}
            attempt = tracing.attempt(ex, 1, "first", target, headers)
            attempt.answer(payload)
            ex.usage, ex.status, ex.outcome = payload["usage"], 200, "ok"
            attempt.done(ex)
            tracing.finished(ex)
            current_trace_id()  # the access log's
            scope["state"]["response_status"] = 200
        if len(queue) > 100:
            queue.clear()
            processor._queued = 0

    return one, queue


def run(n: int) -> float:
    one, _ = _setup()
    for i in range(200):  # warm the caches a running gateway has warm
        one(i)
    t0 = time.perf_counter_ns()
    for i in range(n):
        one(200 + i)
    return (time.perf_counter_ns() - t0) / max(n, 1) / 1000


def calls(n: int) -> float:
    """Function calls (Python and C) per request, counted by cProfile: deterministic on a busy machine."""
    import cProfile
    import pstats

    one, _ = _setup()
    for i in range(200):
        one(i)
    prof = cProfile.Profile()
    prof.enable()
    for i in range(n):
        one(200 + i)
    prof.disable()
    return pstats.Stats(prof).total_calls / n  # type: ignore[attr-defined, no-any-return]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds; the best is reported")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--run", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run is not None:
        run(args.run)
        return 0
    per_call = calls(args.requests)
    best = min(run(args.requests) for _ in range(args.rounds))
    print(f"tracing hooks: {per_call:.1f} calls and {best:.1f} µs per request (best of {args.rounds} x "
          f"{args.requests} requests)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
