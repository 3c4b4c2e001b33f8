"""OTLP protobuf encoding of the gateway's spans: attributes become wire bytes as they are recorded.

The wire format is small and stable (opentelemetry-proto trace/v1). A span's attributes are kept as
their encoded `Span.attributes` fields, so ending a span joins bytes and nothing more; the hooks record
attributes in fixed groups (`Shape`), and a group of low-cardinality values (model, endpoint, tenant,
kind...) is encoded once and then looked up. The test suite decodes the output with opentelemetry-proto.
"""
from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.telemetry.spans import LiteSpan

__all__ = ["Shape", "attribute", "encode_request", "encode_span", "request_prefix", "resource_prefix"]

CACHE_MAX = 4096
"""Entries per cache: a full one is cleared (what churns it is ids and counts; hot entries come back)."""
_pack_q = struct.Struct("<Q").pack
_pack_d = struct.Struct("<d").pack
_BYTE = [bytes((i,)) for i in range(256)]


def varint(n: int) -> bytes:
    if n < 0x80:
        return _BYTE[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field."""
    n = len(payload)
    return tag + (_BYTE[n] if n < 0x80 else varint(n)) + payload


def _any(v: Any) -> bytes:
    """AnyValue: string 1, bool 2, int64 3, double 4, array 5, bytes 7."""
    cls = v.__class__
    if cls is str:
        return _ld(b"\x0a", v.encode())
    if cls is bool:
        return b"\x10\x01" if v else b"\x10\x00"
    if cls is int:
        return b"\x18" + varint(v & 0xFFFFFFFFFFFFFFFF if v < 0 else v)
    if cls is float:
        return b"\x21" + _pack_d(v)
    if cls is tuple or cls is list:
        return _ld(b"\x2a", b"".join([_ld(b"\x0a", _any(x)) for x in v]))
    # Subclasses (an IntEnum, a str enum) as their base type's value.
    if isinstance(v, bool):
        return _any(bool(v))
    if isinstance(v, int):
        return _any(int(v))
    if isinstance(v, float):
        return _any(float(v))
    if isinstance(v, str):
        return _ld(b"\x0a", v.encode())
    if isinstance(v, list | tuple):
        return _any(list(v))
    if isinstance(v, bytes):
        return _ld(b"\x3a", v)
    return _ld(b"\x0a", str(v).encode())


_keys: dict[str, bytes] = {}


def _key(name: str) -> bytes:
    """The encoded `KeyValue.key` field of an attribute name (the gateway's own names: a few dozen)."""
    k = _keys.get(name)
    if k is None:
        k = _ld(b"\x0a", name.encode())
        if len(_keys) < CACHE_MAX:
            _keys[name] = k
    return k


def _field(key: bytes, v: Any) -> bytes:
    """One `Span.attributes` field (9) from an encoded key and a value."""
    if v.__class__ is str:
        b = v.encode()
        n = len(b)
        total = len(key) + n + 4
        if total < 0x80:  # a short string (an id, an address): every length fits one byte
            return b"J" + _BYTE[total] + key + b"\x12" + _BYTE[n + 2] + b"\n" + _BYTE[n] + b
    return _ld(b"\x4a", key + _ld(b"\x12", _any(v)))


def attribute(name: str, value: Any) -> bytes:
    """The encoded attribute field of one (name, value)."""
    return _field(_key(name), value)


class Shape:
    """A group of attributes a hook records together, as a tuple of values in `names` order (None: absent).

    `cached` shapes hold low-cardinality values: their encoding is looked up by the whole tuple, so a
    request pays one dictionary lookup for the group. Arrays are given as tuples (hashable)."""

    __slots__ = ("_cache", "_keys", "names")

    def __init__(self, *names: str, cached: bool = False) -> None:
        self.names = names
        self._keys = tuple(_key(n) for n in names)
        self._cache: dict[tuple[Any, ...], bytes] | None = {} if cached else None

    def encode(self, values: tuple[Any, ...]) -> bytes:
        cache = self._cache
        if cache is not None:
            hit = cache.get(values)
            if hit is not None:
                return hit
        out = b"".join([_field(k, v) for k, v in zip(self._keys, values, strict=True) if v is not None])
        if cache is not None:
            if len(cache) >= CACHE_MAX:
                cache.clear()
            cache[values] = out
        return out

    def pairs(self, values: tuple[Any, ...]) -> dict[str, Any]:
        """The same values as a name -> value mapping (for the SDK's spans)."""
        return {n: (list(v) if isinstance(v, tuple) else v) for n, v in zip(self.names, values, strict=True)
                if v is not None}


_heads: dict[tuple[str, int], bytes] = {}


def encode_span(s: LiteSpan) -> bytes:
    """One `Span` message as the `spans` field (2) of a ScopeSpans: the bytes the export queue holds."""
    head = _heads.get((s.name, s.kind))
    if head is None:
        head = _ld(b"\x2a", s.name.encode()) + b"\x30" + _BYTE[s.kind] + b"\x39"
        if len(_heads) < CACHE_MAX:  # route and model names: bounded by the config
            _heads[(s.name, s.kind)] = head
    parts = [b"\x0a\x10", s.trace_id, b"\x12\x08", s.span_id]
    if s.tracestate:
        parts.append(_ld(b"\x1a", s.tracestate.encode()))
    if s.parent_id:
        parts += (b"\x22\x08", s.parent_id)
    parts += (head, _pack_q(s.start_ns), b"\x41", _pack_q(s.end_ns))
    parts += s.attrs
    if s.status_code:
        message = s.status_message
        status = (_ld(b"\x12", message.encode()) if message else b"") + b"\x18" + _BYTE[s.status_code]
        parts.append(_ld(b"\x7a", status))
    return _ld(b"\x12", b"".join(parts))


def resource_prefix(resource: Mapping[str, Any], scope: str, version: str = "") -> tuple[bytes, bytes]:
    """(Resource message, InstrumentationScope message): the same for every batch."""
    res = b"".join([_ld(b"\x0a", _key(k) + _ld(b"\x12", _any(v))) for k, v in resource.items()])
    sc = _ld(b"\x0a", scope.encode()) + (_ld(b"\x12", version.encode()) if version else b"")
    return res, sc


def request_prefix(prefix: tuple[bytes, bytes], spans_len: int) -> bytes:
    """What precedes `spans_len` bytes of encoded spans in an `ExportTraceServiceRequest` with one
    ResourceSpans holding one ScopeSpans."""
    resource, scope = prefix
    scope_field = _ld(b"\x0a", scope)
    scope_len = len(scope_field) + spans_len
    resource_field = _ld(b"\x0a", resource)
    scope_spans_head = b"\x12" + varint(scope_len)
    rs_len = len(resource_field) + len(scope_spans_head) + scope_len
    return b"\x0a" + varint(rs_len) + resource_field + scope_spans_head + scope_field


def encode_request(spans: Sequence[LiteSpan] | Iterable[LiteSpan], prefix: tuple[bytes, bytes]) -> bytes:
    """An `ExportTraceServiceRequest` holding `spans`."""
    encoded = [encode_span(s) for s in spans]
    return request_prefix(prefix, sum(map(len, encoded))) + b"".join(encoded)
