"""Virtual-time replay: push timed requests through an Engine as fast as the CPU allows.

For routing evaluators and benchmarks; no asyncio, no sleeping, the clock jumps step to step.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from simulator.engine import Engine, SimRequest


@dataclass(slots=True)
class RequestResult:
    """Per-request outcome in engine seconds (relative to the request's arrival)."""

    request_id: str
    arrival: float
    prompt_tokens: int
    cached_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    finish_reason: str | None = None


def replay(engine: Engine, requests: Iterable[SimRequest]) -> dict[str, RequestResult]:
    """Run `requests` (sorted here by arrival) to completion; returns results by request id."""
    pending = sorted(requests, key=lambda r: r.arrival)
    results = {r.request_id: RequestResult(r.request_id, r.arrival, len(r.prompt_token_ids)) for r in pending}
    now, i = 0.0, 0
    while i < len(pending) or engine.has_work():
        while i < len(pending) and pending[i].arrival <= now:
            engine.add_request(pending[i])
            i += 1
        if not engine.has_work():
            now = pending[i].arrival
            continue
        out = engine.step(now)
        now += out.duration
        for ev in out.events:
            res = results[ev.request_id]
            res.output_tokens += len(ev.token_ids)
            if ev.is_first:
                res.cached_tokens, res.ttft = ev.num_cached_tokens, ev.time - res.arrival
            if ev.finished:
                res.e2e, res.finish_reason = ev.time - res.arrival, ev.finish_reason
    return results
