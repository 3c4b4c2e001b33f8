"""Cluster capacity of a workload: the request rate the simulated cluster sustains under a policy.

Load levels in the evaluator are fractions of this number, so "80 % load" means the same thing
for a cheap chat workload and for 7,000-token prompts.

Sustainable means the backlog does not grow: the least-squares slope of the number of requests in
the system, sampled over the second half of the arrivals, is at most ``max_growth`` of the arrival
rate there, with every request served. A slope over many samples, on traces long enough for the
cold start to be a small part (callers give ``make`` a minimum duration), averaged over several
seeds, replaced a two-point test (last arrival vs mid-trace) that a cold start still
draining at mid-trace could fool either way: long-doc-qa's capacity came out 23.9/s in one run
and 55/s in another.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from routing.config import RoutingConfig
from routing.eval.cluster import ClusterResult, simulate
from routing.eval.trace import TraceRecord
from routing.plugins.registry import Registry
from simulator.engine import EngineConfig

__all__ = ["Capacity", "backlog_growth", "in_system", "keeps_up", "measure_capacity"]


@dataclass(frozen=True)
class Capacity:
    rate: float  # requests/s: the highest probed arrival rate the cluster kept up with (mean over seeds)
    probes: tuple[tuple[float, bool], ...]  # (rate, kept up), in probe order
    growth: tuple[tuple[float, tuple[float, ...]], ...] = ()  # (rate, backlog growth per seed)


def in_system(result: ClusterResult, t: float) -> int:
    """Requests that had arrived by ``t`` and not yet finished (unfinished ones count as in system)."""
    return sum(1 for r in result.requests if r.arrival <= t and (r.e2e is None or t < r.arrival + r.e2e))


def backlog_growth(result: ClusterResult, *, start: float = 0.5, samples: int = 32) -> float:
    """Slope of the backlog over the arrivals after ``start`` of the trace, as a fraction of the arrival rate.

    Below capacity the number in the system hovers around a level (Little's law: rate x latency),
    so the slope is ~0; above it the backlog climbs at (arrival - service) rate. A fitted slope over
    ``samples`` points is far less noisy than comparing two instants.
    """
    last = max(r.arrival for r in result.requests)
    t0 = start * last
    if last <= t0:
        return 0.0
    ts = [t0 + (last - t0) * k / (samples - 1) for k in range(samples)]
    ys = [in_system(result, t) for t in ts]
    mt, my = sum(ts) / samples, sum(ys) / samples
    slope = sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / sum((t - mt) ** 2 for t in ts)
    arrivals = sum(1 for r in result.requests if r.arrival >= t0) / (last - t0)
    return slope / arrivals


def keeps_up(result: ClusterResult, *, max_growth: float = 0.05) -> bool:
    """True when every request was served and the backlog grew by at most ``max_growth`` of the arrivals."""
    if not result.requests or any(r.shed is not None for r in result.requests):
        return False
    return backlog_growth(result) <= max_growth


def measure_capacity(
    make: Callable[[float, int], Sequence[TraceRecord]],
    *,
    config: Callable[[Registry], RoutingConfig],
    engine: EngineConfig | Sequence[EngineConfig],
    backends: int,
    lo: float,
    hi: float,
    steps: int = 6,
    seeds: Sequence[int] = (1, 2, 3),
    max_growth: float = 0.05,
) -> Capacity:
    """Bisect (geometrically) the arrival rate in [lo, hi] for the highest one that keeps up.

    ``make(rate, seed)`` generates the workload at that rate (in the workload's own terms: llm-d's is
    the peak of its ramp), so think times and request mix stay as designed; the seed draws a
    different trace and tie-breaks. A rate keeps up when every request is served and the backlog
    growth *averaged over the seeds* is at most ``max_growth``: near capacity one seed's growth
    swings by +-0.2 of the arrival rate (no-sharing), so requiring every seed made the answer
    depend on which seeds were drawn; the mean is close to monotone in the rate, which bisection
    needs. Capacity depends on the policy (cache hits save prefill), so callers say which
    policies define "cluster capacity".
    """
    probes: list[tuple[float, bool]] = []
    growth: list[tuple[float, tuple[float, ...]]] = []
    good = lo
    for _ in range(steps):
        mid = (lo * hi) ** 0.5
        g: list[float] = []
        served = True
        for seed in seeds:
            result = simulate(make(mid, seed), config=config, engine=engine, backends=backends, seed=seed)
            served = bool(result.requests) and all(r.shed is None for r in result.requests)
            if not served:
                break  # a request turned away settles it
            g.append(backlog_growth(result))
        ok = served and sum(g) / len(g) <= max_growth
        probes.append((mid, ok))
        growth.append((mid, tuple(g)))
        if ok:
            good = lo = mid
        else:
            hi = mid
    return Capacity(good, tuple(probes), tuple(growth))
