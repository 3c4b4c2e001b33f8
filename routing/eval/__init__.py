"""Virtual-time evaluation of routing policies against simulated vLLM engines (``gravity eval``).

Deterministic for a seed: the real scheduler, simulated engines, a virtual clock.
"""
from __future__ import annotations

from routing.eval.cluster import ClusterResult, RequestRecord, simulate
from routing.eval.trace import TraceRecord, read_trace, write_trace
from routing.eval.workloads import WORKLOADS, generate

__all__ = [
    "WORKLOADS",
    "ClusterResult",
    "RequestRecord",
    "TraceRecord",
    "generate",
    "read_trace",
    "simulate",
    "write_trace",
]
