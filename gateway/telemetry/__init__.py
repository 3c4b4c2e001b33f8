"""OpenTelemetry traces of the gateway: settings from OTEL_* and `telemetry:`, span helpers, export.

Off unless an OTLP endpoint is configured (docs/tracing.md); off costs one attribute test per helper.
"""
from __future__ import annotations

from gateway.telemetry.config import TelemetryConfig, TelemetryConfigError, TraceSettings, resolve
from gateway.telemetry.setup import build_tracing, tracing_from
from gateway.telemetry.tracing import NOOP, AttemptSpan, ServerSpan, Tracing, current_trace_id

__all__ = [
    "NOOP",
    "AttemptSpan",
    "ServerSpan",
    "TelemetryConfig",
    "TelemetryConfigError",
    "TraceSettings",
    "Tracing",
    "build_tracing",
    "current_trace_id",
    "resolve",
    "tracing_from",
]
