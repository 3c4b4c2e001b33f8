"""Trace settings: the `telemetry:` config section and the standard OTEL_* variables, resolved into one value.

The environment wins over the file, as in every OpenTelemetry SDK. Nothing here imports the SDK, so the
config model loads without it; `resolve` raises `TelemetryConfigError` with the variable or field named.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["BatchConfig", "TelemetryConfig", "TelemetryConfigError", "TraceSettings", "resolve"]

SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on", "parentbased_always_off",
            "parentbased_traceidratio")
Protocol = Literal["http/protobuf", "grpc"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BatchConfig(_Model):
    """The span batching of OTEL_BSP_* (the same defaults as the SDK's)."""

    schedule_delay_ms: int = Field(5000, ge=0)
    max_queue_size: int = Field(2048, gt=0)
    max_export_batch_size: int = Field(512, gt=0)
    export_timeout_ms: int = Field(30000, gt=0)


class TelemetryConfig(_Model):
    """`telemetry:` in the gateway's YAML. Each field has an OTEL_* variable that overrides it (docs/tracing.md)."""

    sdk_disabled: bool = False
    """OTEL_SDK_DISABLED: no tracing whatever else is set."""
    traces_exporter: Literal["otlp", "none"] | None = None
    """OTEL_TRACES_EXPORTER; `otlp` once an endpoint is set."""
    endpoint: str | None = None
    """OTEL_EXPORTER_OTLP_ENDPOINT: the collector's base URL (`/v1/traces` is added for http/protobuf)."""
    traces_endpoint: str | None = None
    """OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: the full URL, used as it is."""
    protocol: Protocol | None = None
    """OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL: `http/protobuf` (default) or `grpc` (needs the otlp-grpc extra)."""
    headers: dict[str, str] = Field(default_factory=dict)
    """OTEL_EXPORTER_OTLP_(TRACES_)HEADERS: sent with every export (a collector's API key, say)."""
    timeout_ms: int | None = Field(None, gt=0)
    """OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT: one export's deadline (default 10000)."""
    compression: Literal["gzip", "none"] | None = None
    """OTEL_EXPORTER_OTLP_(TRACES_)COMPRESSION."""
    service_name: str | None = None
    """OTEL_SERVICE_NAME (default `gravity`)."""
    resource_attributes: dict[str, str] = Field(default_factory=dict)
    """OTEL_RESOURCE_ATTRIBUTES (key=value,...); the variable's keys win over these."""
    sampler: str | None = None
    """OTEL_TRACES_SAMPLER: one of always_on, always_off, traceidratio, parentbased_always_on (default),
    parentbased_always_off, parentbased_traceidratio."""
    sampler_arg: float | None = Field(None, ge=0, le=1)
    """OTEL_TRACES_SAMPLER_ARG: the ratio of the traceidratio samplers (default 1.0)."""
    batch: BatchConfig = BatchConfig()
    """OTEL_BSP_SCHEDULE_DELAY, OTEL_BSP_MAX_QUEUE_SIZE, OTEL_BSP_MAX_EXPORT_BATCH_SIZE, OTEL_BSP_EXPORT_TIMEOUT."""
    processor: Literal["loop", "thread"] | None = None
    """GRAVITY_OTEL_PROCESSOR: `loop` (default): the gateway's own spans, exported from the event loop with
    aiohttp; `thread`: the OpenTelemetry SDK's spans, BatchSpanProcessor and exporter (its own thread, a
    blocking HTTP client; several times the CPU, docs/decisions/0004-span-recorder.md). grpc is always `thread`."""
    capture_content: bool | None = None
    """OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT: record prompts and completions on the inference
    spans (the conventions' opt-in `gen_ai.input.messages` / `gen_ai.output.messages`). Off by default."""


class TelemetryConfigError(ValueError):
    """A tracing setting that cannot start a gateway (the message names the variable or field)."""


@dataclass(frozen=True)
class TraceSettings:
    """What `resolve` decided: `enabled` False means the no-op path (no SDK objects at all)."""

    enabled: bool
    endpoint: str = ""
    protocol: Protocol = "http/protobuf"
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 10.0
    compression: str = "none"
    service_name: str = "gravity"
    resource: Mapping[str, str] = field(default_factory=dict)
    sampler: str = "parentbased_always_on"
    sampler_arg: float = 1.0
    batch: BatchConfig = field(default_factory=BatchConfig)
    processor: Literal["loop", "thread"] = "loop"
    capture_content: bool = False

    @property
    def server_address(self) -> tuple[str, int]:
        parts = urlsplit(self.endpoint)
        return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


OFF = TraceSettings(enabled=False)


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    v = raw.strip().lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off"):
        return False
    raise TelemetryConfigError(f"{name}: {raw!r} is not a boolean (write true or false)")


def _int(env: Mapping[str, str], name: str, default: int, *, positive: bool = True) -> int:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        v = int(raw.strip())
    except ValueError:
        raise TelemetryConfigError(f"{name}: {raw!r} is not an integer") from None
    if v < 0 or (positive and v == 0):
        raise TelemetryConfigError(f"{name}: {raw!r} must be {'positive' if positive else 'non-negative'}")
    return v


def _pairs(name: str, raw: str) -> dict[str, str]:
    """W3C-baggage-style `k=v,k2=v2` (values percent-decoded), as OTEL_RESOURCE_ATTRIBUTES and _HEADERS are."""
    out: dict[str, str] = {}
    for part in raw.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise TelemetryConfigError(f"{name}: {part.strip()!r} is not key=value")
        out[unquote(key.strip())] = unquote(value.strip())
    return out


def _first(env: Mapping[str, str], *names: str) -> str | None:
    for n in names:
        v = env.get(n)
        if v is not None and v.strip():
            return v.strip()
    return None


def resolve(cfg: TelemetryConfig, env: Mapping[str, str]) -> TraceSettings:
    """The settings in force: each OTEL_* variable when set, else the config field, else the default."""
    if _bool(env, "OTEL_SDK_DISABLED", cfg.sdk_disabled):
        return OFF
    exporter = _first(env, "OTEL_TRACES_EXPORTER") or cfg.traces_exporter
    if exporter is not None and exporter not in ("otlp", "none"):
        raise TelemetryConfigError(f"OTEL_TRACES_EXPORTER: {exporter!r} is not supported (otlp or none)")
    if exporter == "none":
        return OFF
    protocol = _first(env, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL") or cfg.protocol \
        or "http/protobuf"
    if protocol not in ("http/protobuf", "grpc"):
        raise TelemetryConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported "
                                   "(http/protobuf or grpc; http/json is not)")
    full = _first(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    base = _first(env, "OTEL_EXPORTER_OTLP_ENDPOINT")
    if full is None and base is None:  # the file only when the environment names no endpoint at all
        full, base = cfg.traces_endpoint, cfg.endpoint
    if full is None and base is None:
        # No endpoint: tracing is off (the no-op path), whatever the exporter says. A gateway that
        # silently sent spans to localhost:4318 would surprise more than one that sends none.
        return OFF
    if full is not None:
        endpoint = full
    else:
        assert base is not None
        endpoint = base if protocol == "grpc" else base.rstrip("/") + "/v1/traces"
    scheme = urlsplit(endpoint).scheme
    if scheme not in ("http", "https") or not urlsplit(endpoint).hostname:
        raise TelemetryConfigError(f"OTLP endpoint: {endpoint!r} is not an http(s) URL")
    if protocol == "grpc" and importlib.util.find_spec("opentelemetry.exporter.otlp.proto.grpc") is None:
        raise TelemetryConfigError(
            "OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs the gRPC exporter, which is not installed: "
            "pip install 'gravity-gateway[otlp-grpc]' (or use http/protobuf, the default)")
    headers = dict(cfg.headers)
    for name in ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"):
        raw = env.get(name)
        if raw:
            headers.update(_pairs(name, raw))
    timeout_ms = cfg.timeout_ms or 10000
    for name in ("OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"):
        timeout_ms = _int(env, name, timeout_ms)
    compression = _first(env, "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "OTEL_EXPORTER_OTLP_COMPRESSION") \
        or cfg.compression or "none"
    if compression not in ("gzip", "none"):
        raise TelemetryConfigError(f"OTEL_EXPORTER_OTLP_COMPRESSION: {compression!r} is not supported (gzip or none)")
    resource = dict(cfg.resource_attributes)
    if env.get("OTEL_RESOURCE_ATTRIBUTES"):
        resource.update(_pairs("OTEL_RESOURCE_ATTRIBUTES", env["OTEL_RESOURCE_ATTRIBUTES"]))
    service = _first(env, "OTEL_SERVICE_NAME") or cfg.service_name or resource.get("service.name") or "gravity"
    sampler = _first(env, "OTEL_TRACES_SAMPLER") or cfg.sampler or "parentbased_always_on"
    if sampler not in SAMPLERS:
        raise TelemetryConfigError(f"OTEL_TRACES_SAMPLER: {sampler!r} is not one of {', '.join(SAMPLERS)}")
    arg = cfg.sampler_arg if cfg.sampler_arg is not None else 1.0
    raw_arg = _first(env, "OTEL_TRACES_SAMPLER_ARG")
    if raw_arg is not None:
        try:
            arg = float(raw_arg)
        except ValueError:
            raise TelemetryConfigError(f"OTEL_TRACES_SAMPLER_ARG: {raw_arg!r} is not a number") from None
        if not 0.0 <= arg <= 1.0:
            raise TelemetryConfigError(f"OTEL_TRACES_SAMPLER_ARG: {raw_arg!r} is not a ratio in [0, 1]")
    b = cfg.batch
    batch = BatchConfig(
        schedule_delay_ms=_int(env, "OTEL_BSP_SCHEDULE_DELAY", b.schedule_delay_ms, positive=False),
        max_queue_size=_int(env, "OTEL_BSP_MAX_QUEUE_SIZE", b.max_queue_size),
        max_export_batch_size=_int(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", b.max_export_batch_size),
        export_timeout_ms=_int(env, "OTEL_BSP_EXPORT_TIMEOUT", b.export_timeout_ms))
    if batch.max_export_batch_size > batch.max_queue_size:
        raise TelemetryConfigError("OTEL_BSP_MAX_EXPORT_BATCH_SIZE must not exceed OTEL_BSP_MAX_QUEUE_SIZE")
    processor = _first(env, "GRAVITY_OTEL_PROCESSOR") or cfg.processor or "loop"
    if processor not in ("loop", "thread"):
        raise TelemetryConfigError(f"GRAVITY_OTEL_PROCESSOR: {processor!r} is not loop or thread")
    if protocol == "grpc":
        processor = "thread"
    capture = _bool(env, "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", bool(cfg.capture_content))
    return TraceSettings(
        enabled=True, endpoint=endpoint, protocol=protocol, headers=headers,  # type: ignore[arg-type]
        timeout_s=timeout_ms / 1000, compression=compression, service_name=service, resource=resource,
        sampler=sampler, sampler_arg=arg, batch=batch, processor=processor,  # type: ignore[arg-type]
        capture_content=capture)
