"""OTLP protobuf encoding of LiteSpans: `ExportTraceServiceRequest` bytes, written field by field.

The wire format is small and stable (opentelemetry-proto trace/v1). Attribute keys and the low-
cardinality key/value pairs (model, endpoint, kind, tenant...) repeat on every request, so their
encodings are cached; the test suite decodes the output with opentelemetry-proto itself.
"""
from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from gateway.telemetry.spans import LiteSpan

__all__ = ["encode_encoded", "encode_request", "encode_span", "resource_prefix"]

_CACHE_MAX = 8192
_kv_cache: dict[tuple[str, type, Any], bytes] = {}
_str_cache: dict[str, bytes] = {}
_name_cache: dict[tuple[str, int], bytes] = {}
_pack_q = struct.Struct("<Q").pack
_pack_d = struct.Struct("<d").pack


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field."""
    return tag + _varint(len(payload)) + payload


def _str(tag: bytes, s: str) -> bytes:
    return _ld(tag, s.encode())


def _any(v: Any) -> bytes:
    """AnyValue: string 1, bool 2, int64 3, double 4, array 5."""
    if isinstance(v, str):
        return _str(b"\x0a", v)
    if isinstance(v, bool):
        return b"\x10\x01" if v else b"\x10\x00"
    if isinstance(v, int):
        return b"\x18" + _varint(v & 0xFFFFFFFFFFFFFFFF if v < 0 else v)
    if isinstance(v, float):
        return b"\x21" + _pack_d(v)
    if isinstance(v, list | tuple):
        return _ld(b"\x2a", b"".join(_ld(b"\x0a", _any(x)) for x in v))
    if isinstance(v, bytes):
        return _ld(b"\x3a", v)
    return _str(b"\x0a", str(v))


def _kv(tag: bytes, key: str, value: Any) -> bytes:
    """One KeyValue as the `tag` field of its parent (attributes: 1 in Resource, 9 in Span)."""
    k = _str_cache.get(key)
    if k is None:
        k = _str(b"\x0a", key)
        if len(_str_cache) < _CACHE_MAX:  # keys are the gateway's own names: a few dozen
            _str_cache[key] = k
    return _ld(tag, k + _ld(b"\x12", _any(value)))


def _attributes(tag: bytes, attrs: Mapping[str, Any]) -> bytes:
    return b"".join(_kv(tag, k, v) for k, v in attrs.items())


def _span_attributes(attrs: Mapping[str, Any]) -> bytes:
    """A span's attributes; the encodings of repeated (key, value) pairs of plain types come from the cache."""
    cache = _kv_cache
    out = []
    for k, v in attrs.items():
        cls = v.__class__
        if cls is str or cls is int or cls is bool:
            ck = (k, cls, v)
            hit = cache.get(ck)
            if hit is None:
                hit = _kv(b"\x4a", k, v)
                if len(cache) >= _CACHE_MAX:
                    cache.clear()  # ids and counts churn it; the hot pairs come back at once
                cache[ck] = hit
            out.append(hit)
        else:
            out.append(_kv(b"\x4a", k, v))
    return b"".join(out)


def encode_span(s: LiteSpan) -> bytes:
    """One `Span` message."""
    parts = [b"\x0a\x10", s.trace_id, b"\x12\x08", s.span_id]
    if s.tracestate:
        parts.append(_str(b"\x1a", s.tracestate))
    if s.parent_id:
        parts += (b"\x22\x08", s.parent_id)
    head = _name_cache.get((s.name, s.kind))
    if head is None:
        head = _str(b"\x2a", s.name) + b"\x30" + bytes((s.kind,)) + b"\x39"
        if len(_name_cache) < _CACHE_MAX:  # route and model names: bounded by the config
            _name_cache[(s.name, s.kind)] = head
    parts += (head, _pack_q(s.start_ns), b"\x41", _pack_q(s.end_ns), _span_attributes(s.attributes))
    if s.status_code:
        status = (_str(b"\x12", s.status_message) if s.status_message else b"") + b"\x18" + bytes((s.status_code,))
        parts.append(_ld(b"\x7a", status))
    return b"".join(parts)


def resource_prefix(resource: Mapping[str, Any], scope: str, version: str = "") -> tuple[bytes, bytes]:
    """(Resource message, InstrumentationScope message): the same for every batch."""
    res = _attributes(b"\x0a", resource)
    sc = _str(b"\x0a", scope) + (_str(b"\x12", version) if version else b"")
    return res, sc


def encode_request(spans: Sequence[LiteSpan] | Iterable[LiteSpan], prefix: tuple[bytes, bytes]) -> bytes:
    """An `ExportTraceServiceRequest` with one ResourceSpans and one ScopeSpans holding `spans`."""
    return encode_encoded([encode_span(s) for s in spans], prefix)


def encode_encoded(spans: Iterable[bytes], prefix: tuple[bytes, bytes]) -> bytes:
    """The same from spans already encoded by `encode_span`."""
    resource, scope = prefix
    scope_spans = _ld(b"\x0a", scope) + b"".join(_ld(b"\x12", s) for s in spans)
    resource_spans = _ld(b"\x0a", resource) + _ld(b"\x12", scope_spans)
    return _ld(b"\x0a", resource_spans)
