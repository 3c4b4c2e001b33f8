"""Build the gateway's `Tracing` from its settings: a TracerProvider of its own (never the global one),
the sampler, the resource and the span processor; or the no-op `NOOP` when tracing is off."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from gateway.telemetry.config import TelemetryConfig, TraceSettings, resolve
from gateway.telemetry.tracing import NOOP, Tracing

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = ["build_tracing", "tracing_from"]


def _sampler(settings: TraceSettings) -> object:
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


def tracing_from(settings: TraceSettings, registry: CollectorRegistry | None = None) -> Tracing:
    if not settings.enabled:
        return NOOP
    # Imported here: a gateway with tracing off never loads the SDK's exporter machinery.
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    from gateway.telemetry.export import CountingThreadProcessor, ExportCounters, LoopSpanProcessor

    counters = ExportCounters(registry)
    processor: LoopSpanProcessor | CountingThreadProcessor
    if settings.processor == "loop":
        processor = LoopSpanProcessor(settings.endpoint, settings.headers, settings.timeout_s, settings.compression,
                                      settings.batch, counters)
    else:
        processor = CountingThreadProcessor(_sdk_exporter(settings), settings.batch, counters)
    resource = Resource({"telemetry.sdk.language": "python", "telemetry.sdk.name": "opentelemetry",
                         **settings.resource, "service.name": settings.service_name})
    provider = TracerProvider(sampler=_sampler(settings), resource=resource)  # type: ignore[arg-type]
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("gravity")
    return Tracing(tracer, capture_content=settings.capture_content, processor=processor, provider=provider,
                   counters=counters)


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
