"""Capacity search: the backlog test and the bisection, on synthetic results and the tiny engine."""
from __future__ import annotations

import functools

from routing.eval.capacity import backlog_growth, in_system, keeps_up, measure_capacity
from routing.eval.cluster import ClusterResult, RequestRecord
from routing.eval.policies import policy_config
from routing.eval.trace import TraceRecord
from simulator.profiles import get_profile


def _result(latency_of: list[float]) -> ClusterResult:
    reqs = [RequestRecord(f"r{i}", arrival=float(i), ttft=0.1, e2e=lat) for i, lat in enumerate(latency_of)]
    return ClusterResult("p", reqs, [], makespan=max(r.arrival + (r.e2e or 0) for r in reqs))


def test_steady_backlog_keeps_up_and_growing_backlog_does_not() -> None:
    steady = _result([3.0] * 100)  # about 3 in the system at any time
    assert in_system(steady, 50.0) == 3 and keeps_up(steady)
    growing = _result([1.0 + 2.0 * i for i in range(100)])  # each waits longer than the last
    assert not keeps_up(growing)


def test_a_draining_cold_start_keeps_up_and_slow_growth_does_not() -> None:
    # A backlog left by a cold start that drains while arrivals continue is not overload, however
    # large it is at mid-trace; a backlog that keeps creeping up is, however small at the end.
    draining = _result([max(3.0, 60.0 - i) for i in range(100)])
    assert backlog_growth(draining) < 0 and keeps_up(draining)
    creeping = _result([3.0 + 0.2 * i for i in range(100)])  # 1 in 6 arrivals is not served in time
    assert backlog_growth(creeping) > 0.05 and not keeps_up(creeping)


def test_unfinished_or_shed_requests_do_not_keep_up() -> None:
    result = _result([1.0] * 10)
    result.requests[3].shed = "rejected_by_engine"
    assert not keeps_up(result)


def test_bisection_brackets_the_tiny_clusters_capacity() -> None:
    engine = get_profile("tiny")

    def make(rate: float, seed: int) -> list[TraceRecord]:
        return [TraceRecord(i / rate, "m", 16, prompt=f"{seed} {i} " + "word " * 200) for i in range(120)]

    cap = measure_capacity(make, config=functools.partial(policy_config, "round-robin"), engine=engine,
                           backends=2, lo=1.0, hi=2000.0, steps=6, seeds=(1, 2))
    kept = [r for r, ok in cap.probes if ok]
    lost = [r for r, ok in cap.probes if not ok]
    assert kept and lost and cap.rate == max(kept) < min(lost)
