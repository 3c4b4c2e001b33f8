"""Summaries of a :class:`ClusterResult`: TTFT and latency percentiles, throughput, hit rate, imbalance.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from routing.eval.cluster import ClusterResult

__all__ = ["percentile", "summarize"]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def summarize(result: ClusterResult) -> dict[str, Any]:
    done = [r for r in result.requests if r.e2e is not None]
    ttft = [r.ttft for r in result.requests if r.ttft is not None]
    e2e = [r.e2e for r in done if r.e2e is not None]
    prompt = sum(r.prompt_tokens for r in result.requests if r.ttft is not None)
    cached = sum(r.cached_tokens for r in result.requests if r.ttft is not None)
    counts = [e.requests for e in result.endpoints]
    busy = [e.busy_s for e in result.endpoints]
    mean_count = sum(counts) / len(counts) if counts else 0.0
    mean_busy = sum(busy) / len(busy) if busy else 0.0
    makespan = result.makespan or 1.0
    return {
        "policy": result.policy,
        "requests": len(result.requests),
        "completed": len(done),
        "shed": sum(1 for r in result.requests if r.shed is not None),
        "ttft_p50": percentile(ttft, 50),
        "ttft_p90": percentile(ttft, 90),
        "ttft_p99": percentile(ttft, 99),
        "e2e_p50": percentile(e2e, 50),
        "e2e_p90": percentile(e2e, 90),
        "e2e_p99": percentile(e2e, 99),
        "output_tok_s": sum(r.output_tokens for r in result.requests) / makespan,
        "hit_rate": cached / prompt if prompt else 0.0,
        "imbalance_requests": max(counts) / mean_count if mean_count else 0.0,
        "imbalance_busy": max(busy) / mean_busy if mean_busy else 0.0,
        "utilization": mean_busy / makespan,
        "preemptions": sum(e.preemptions for e in result.endpoints),
        "makespan_s": result.makespan,
        "decision_us_p50": percentile(result.decision_latency_s, 50) * 1e6,
    }
