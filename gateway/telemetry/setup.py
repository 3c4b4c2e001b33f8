"""Build the gateway's `Tracing` from its settings: the recorder, its sampler, the resource and the
exporter; or the no-op `NOOP` when tracing is off."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from gateway.telemetry.config import TelemetryConfig, TraceSettings, resolve
from gateway.telemetry.tracing import NOOP, Tracing

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = ["build_tracing", "tracing_from"]

SCOPE = "gravity"
"""The instrumentation scope name of every span."""


def _resource(settings: TraceSettings) -> dict[str, Any]:
    return {"telemetry.sdk.language": "python", "telemetry.sdk.name": "gravity", **settings.resource,
            "service.name": settings.service_name}


def tracing_from(settings: TraceSettings, registry: CollectorRegistry | None = None) -> Tracing:
    if not settings.enabled:
        return NOOP
    from gateway.telemetry.export import ExportCounters

    counters = ExportCounters(registry)
    if settings.processor == "loop":
        from gateway.telemetry.export import LoopSpanProcessor
        from gateway.telemetry.otlp import resource_prefix
        from gateway.telemetry.spans import LiteRecorder, sampler

        processor = LoopSpanProcessor(settings.endpoint, settings.headers, settings.timeout_s, settings.compression,
                                      settings.batch, counters, resource_prefix(_resource(settings), SCOPE))
        recorder: Any = LiteRecorder(sampler(settings.sampler, settings.sampler_arg), processor.on_end)
        return Tracing(recorder, capture_content=settings.capture_content, processor=processor, counters=counters)
    # The SDK's spans and exporter: gRPC, or `processor: thread` asked for by name.
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    from gateway.telemetry.sdk import CountingThreadProcessor, SdkRecorder

    thread = CountingThreadProcessor(_sdk_exporter(settings), settings.batch, counters)
    provider = TracerProvider(sampler=_sdk_sampler(settings), resource=Resource(_resource(settings)))  # type: ignore[arg-type]
    provider.add_span_processor(thread)
    return Tracing(SdkRecorder(provider.get_tracer(SCOPE)), capture_content=settings.capture_content,
                   processor=thread, counters=counters)


def _sdk_sampler(settings: TraceSettings) -> object:
    from opentelemetry.sdk.trace import sampling

    name, arg = settings.sampler, settings.sampler_arg
    root = {"always_on": sampling.ALWAYS_ON, "always_off": sampling.ALWAYS_OFF}
    if name in root:
        return root[name]
    if name == "traceidratio":
        return sampling.TraceIdRatioBased(arg)
    inner = {"parentbased_always_on": sampling.ALWAYS_ON, "parentbased_always_off": sampling.ALWAYS_OFF,
             "parentbased_traceidratio": sampling.TraceIdRatioBased(arg)}[name]
    return sampling.ParentBased(inner)


def _sdk_exporter(settings: TraceSettings) -> SpanExporter:
    if settings.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        exporter: SpanExporter = GrpcExporter(endpoint=settings.endpoint, headers=dict(settings.headers),
                                              timeout=settings.timeout_s,
                                              insecure=settings.endpoint.startswith("http://"))
        return exporter
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=settings.endpoint, headers=dict(settings.headers), timeout=settings.timeout_s,
                            compression=Compression.Gzip if settings.compression == "gzip"
                            else Compression.NoCompression)


def build_tracing(cfg: TelemetryConfig, registry: CollectorRegistry | None = None,
                  env: Mapping[str, str] | None = None) -> Tracing:
    """The gateway's tracing from its `telemetry:` section and the OTEL_* environment (which wins)."""
    return tracing_from(resolve(cfg, os.environ if env is None else env), registry)
