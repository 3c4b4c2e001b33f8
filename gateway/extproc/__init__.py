"""Gravity as an Envoy ext_proc sidecar speaking the endpoint-picker protocol (docs/extproc.md).

Import `gateway.extproc.server` only where gRPC is wanted: the proxy never loads it.
"""
from __future__ import annotations

__all__: list[str] = []
