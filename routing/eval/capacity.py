"""Cluster capacity of a workload: the request rate the simulated cluster sustains under a policy.

Load levels in the evaluator are fractions of this number, so "80 % load" means the same thing
for a cheap chat workload and for 7,000-token prompts.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from routing.config import RoutingConfig
from routing.eval.cluster import ClusterResult, simulate
from routing.eval.trace import TraceRecord
from routing.plugins.registry import Registry
from simulator.engine import EngineConfig

__all__ = ["Capacity", "in_system", "keeps_up", "measure_capacity"]


@dataclass(frozen=True)
class Capacity:
    rate: float  # requests/s: the highest probed arrival rate the cluster kept up with
    probes: tuple[tuple[float, bool], ...]  # (rate, kept up), in probe order


def in_system(result: ClusterResult, t: float) -> int:
    """Requests that had arrived by ``t`` and not yet finished (unfinished ones count as in system)."""
    return sum(1 for r in result.requests if r.arrival <= t and (r.e2e is None or t < r.arrival + r.e2e))


def keeps_up(result: ClusterResult, *, growth: float = 1.25, noise: int = 16) -> bool:
    """True when the backlog did not grow over the second half of the arrivals.

    Below capacity the number of requests in the system hovers around a level (Little's law:
    rate x latency); above it, it climbs for as long as arrivals continue. Cold caches at the
    start only inflate the mid-trace count, so this never mistakes warm-up for overload.
    """
    if not result.requests or any(r.shed is not None for r in result.requests):
        return False
    last = max(r.arrival for r in result.requests)
    return in_system(result, last) <= growth * in_system(result, last / 2) + noise


def measure_capacity(
    make: Callable[[float], Sequence[TraceRecord]],
    *,
    config: Callable[[Registry], RoutingConfig],
    engine: EngineConfig,
    backends: int,
    lo: float,
    hi: float,
    steps: int = 6,
    seed: int = 0,
) -> Capacity:
    """Bisect (geometrically) the arrival rate in [lo, hi] for the highest one that keeps up.

    ``make(rate)`` generates the workload at that rate (in the workload's own terms: llm-d's is the
    peak of its ramp), so think times and request mix stay as designed. Capacity depends on the
    policy (cache hits save prefill), so callers say which policies define "cluster capacity".
    """
    probes: list[tuple[float, bool]] = []
    good = lo
    for _ in range(steps):
        mid = (lo * hi) ** 0.5
        ok = keeps_up(simulate(make(mid), config=config, engine=engine, backends=backends, seed=seed))
        probes.append((mid, ok))
        if ok:
            good = lo = mid
        else:
            hi = mid
    return Capacity(good, tuple(probes))
