"""A vLLM stand-in for tests, demos and routing benchmarks: a pure engine plus an HTTP server.

The engine (`Engine.step`) runs in real time behind HTTP or in virtual time inside evaluators.
"""
from __future__ import annotations

from simulator.engine import Engine, EngineConfig, SimRequest, StepOutcome, TokenEvent
from simulator.kvcache import KVCache
from simulator.profiles import get_profile, profile_names
from simulator.runner import EngineRunner, RequestStream
from simulator.stats import EngineStats, Histogram
from simulator.virtual import RequestResult, replay

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineRunner",
    "EngineStats",
    "Histogram",
    "KVCache",
    "RequestResult",
    "RequestStream",
    "SimRequest",
    "StepOutcome",
    "TokenEvent",
    "get_profile",
    "profile_names",
    "replay",
]
