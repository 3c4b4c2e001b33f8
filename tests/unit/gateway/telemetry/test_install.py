"""The installed OTLP modules are opentelemetry-proto's own, whatever else shipped files at their paths.

xds-protos (the ext_proc messages) ships an older copy of `opentelemetry/proto/...`; when pip
installs it after opentelemetry-proto, the exporter cannot import and every gateway with tracing
on fails to start. `make install` and the Dockerfile put opentelemetry-proto's files back; this
fails when an install path forgets to.
"""
from __future__ import annotations

import importlib


def test_the_otlp_http_exporter_imports() -> None:
    importlib.import_module("opentelemetry.exporter.otlp.proto.http.trace_exporter")


def test_the_proto_modules_are_opentelemetry_protos_version() -> None:
    common = importlib.import_module("opentelemetry.proto.common.v1.common_pb2")
    assert hasattr(common, "InstrumentationScope"), (
        f"{common.__file__} is an older copy (another package's); reinstall opentelemetry-proto")
