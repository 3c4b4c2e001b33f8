"""Trace settings: OTEL_* variables over the `telemetry:` section over the defaults, and clear refusals."""
from __future__ import annotations

import importlib.util

import pytest

from gateway.config import ConfigError, parse_config
from gateway.telemetry import NOOP, TelemetryConfig, TelemetryConfigError, build_tracing, resolve

URL = "http://collector:4318"


def test_no_endpoint_means_tracing_off_and_the_noop_path() -> None:
    assert not resolve(TelemetryConfig(), {}).enabled
    assert not resolve(TelemetryConfig(traces_exporter="otlp"), {"OTEL_SERVICE_NAME": "x"}).enabled
    assert build_tracing(TelemetryConfig(), env={}) is NOOP


def test_an_endpoint_turns_otlp_http_on_with_the_signal_path() -> None:
    s = resolve(TelemetryConfig(), {"OTEL_EXPORTER_OTLP_ENDPOINT": URL + "/"})
    assert s.enabled and s.protocol == "http/protobuf" and s.endpoint == URL + "/v1/traces"
    assert s.service_name == "gravity" and s.sampler == "parentbased_always_on" and s.processor == "loop"
    # The per-signal variable is used as it is.
    s = resolve(TelemetryConfig(), {"OTEL_EXPORTER_OTLP_ENDPOINT": URL,
                                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://other:9/custom"})
    assert s.endpoint == "http://other:9/custom"


def test_the_environment_wins_over_the_file() -> None:
    cfg = TelemetryConfig(endpoint="http://file:4318", service_name="from-file", sampler="traceidratio",
                          sampler_arg=0.5, resource_attributes={"deployment.environment": "file", "team": "a"},
                          headers={"x-key": "file"})
    s = resolve(cfg, {})
    assert (s.endpoint, s.service_name, s.sampler, s.sampler_arg) == (
        "http://file:4318/v1/traces", "from-file", "traceidratio", 0.5)
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": URL, "OTEL_SERVICE_NAME": "from-env", "OTEL_TRACES_SAMPLER_ARG": "0.1",
           "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,region=eu%2Dwest",
           "OTEL_EXPORTER_OTLP_HEADERS": "x-key=env", "OTEL_BSP_MAX_QUEUE_SIZE": "4096",
           "OTEL_BSP_SCHEDULE_DELAY": "250"}
    s = resolve(cfg, env)
    assert s.endpoint == URL + "/v1/traces" and s.service_name == "from-env" and s.sampler_arg == 0.1
    assert s.sampler == "traceidratio"  # the file's, as the environment says nothing about it
    assert s.resource == {"deployment.environment": "prod", "team": "a", "region": "eu-west"}
    assert s.headers == {"x-key": "env"}
    assert s.batch.max_queue_size == 4096 and s.batch.schedule_delay_ms == 250


def test_switches_that_turn_tracing_off() -> None:
    on = {"OTEL_EXPORTER_OTLP_ENDPOINT": URL}
    assert not resolve(TelemetryConfig(), {**on, "OTEL_SDK_DISABLED": "true"}).enabled
    assert not resolve(TelemetryConfig(), {**on, "OTEL_TRACES_EXPORTER": "none"}).enabled
    assert not resolve(TelemetryConfig(sdk_disabled=True), on).enabled
    assert resolve(TelemetryConfig(sdk_disabled=True), {**on, "OTEL_SDK_DISABLED": "false"}).enabled


@pytest.mark.parametrize(("env", "names"), [
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
    ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER"),
    ({"OTEL_TRACES_SAMPLER_ARG": "1.5"}, "OTEL_TRACES_SAMPLER_ARG"),
    ({"OTEL_BSP_MAX_QUEUE_SIZE": "-3"}, "OTEL_BSP_MAX_QUEUE_SIZE"),
    ({"OTEL_SDK_DISABLED": "maybe"}, "OTEL_SDK_DISABLED"),
    ({"OTEL_RESOURCE_ATTRIBUTES": "novalue"}, "OTEL_RESOURCE_ATTRIBUTES"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, "endpoint"),
])
def test_bad_settings_are_refused_by_name(env: dict[str, str], names: str) -> None:
    with pytest.raises(TelemetryConfigError, match=names):
        resolve(TelemetryConfig(), {"OTEL_EXPORTER_OTLP_ENDPOINT": URL, **env})


@pytest.mark.skipif(importlib.util.find_spec("opentelemetry.exporter.otlp.proto.grpc") is not None,
                    reason="the gRPC exporter is installed here")
def test_grpc_without_its_exporter_is_a_start_up_error_that_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with pytest.raises(ConfigError, match=r"telemetry: OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs the gRPC exporter.*"
                                          r"otlp-grpc"):
        parse_config({})


def test_the_config_section_is_validated_with_its_path() -> None:
    with pytest.raises(ConfigError, match="telemetry.sampler_arg"):
        parse_config({"telemetry": {"sampler_arg": 2}})
    with pytest.raises(ConfigError, match="telemetry.bogus"):
        parse_config({"telemetry": {"bogus": 1}})
