"""OTLP protobuf encoding of the gateway's spans: a request's spans in one pass when its SERVER span ends.

The wire format is small and stable (opentelemetry-proto trace/v1). The hooks record attributes in
fixed groups (`Shape`) as raw values; `encode_trace` writes a whole trace in one loop, and a group of
low-cardinality values (model, endpoint, tenant, kind...) is encoded once and then looked up. The
test suite decodes the output with opentelemetry-proto.
"""
from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.telemetry.spans import LiteSpan

__all__ = ["Shape", "attribute", "encode_request", "encode_span", "encode_trace", "request_prefix", "resource_prefix",
           "single"]

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
        return _ld(b"\x2a", _array(v))
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


def _array(v: tuple[Any, ...] | list[Any]) -> bytes:
    """ArrayValue's `values` fields; short strings and doubles (the gateway's arrays) without a call each."""
    parts: list[bytes] = []
    byte = _BYTE
    for x in v:
        cls = x.__class__
        if cls is str:
            b = x.encode()
            n = len(b)
            if n < 0x7E:
                parts += (b"\x0a", byte[n + 2], b"\x0a", byte[n], b)
                continue
        elif cls is float:
            parts += (b"\x0a\x09\x21", _pack_d(x))
            continue
        parts.append(_ld(b"\x0a", _any(x)))
    return b"".join(parts)


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


_singles: dict[str, Shape] = {}


def single(name: str) -> Shape:
    """The one-attribute Shape of `name` (set_attribute's; the gateway's own names: a few dozen)."""
    shape = _singles.get(name)
    if shape is None:
        shape = Shape(name)
        if len(_singles) < CACHE_MAX:
            _singles[name] = shape
    return shape


_heads: dict[tuple[str, int], bytes] = {}


def encode_trace(root: LiteSpan) -> tuple[bytes, int]:
    """`root` and every span that ended inside it, as `spans` fields of a ScopeSpans, and their count.

    One pass over a request's spans: the children's ids are drawn together here (nothing propagated
    them), the attribute groups are encoded in this loop (a cached group is one lookup; a str, int,
    float or bool is written inline, the rest by `_field`)."""
    spans = [root]
    for s in spans:  # the list grows while it is walked: children, then theirs
        if s.children:
            spans += s.children
    missing = [s for s in spans if not s.span_id]
    if missing:
        ids = (root._rec.rng.getrandbits(64 * len(missing)) | 1).to_bytes(8 * len(missing), "big")
        for i, s in enumerate(missing):
            s.span_id = ids[8 * i:8 * i + 8]
            for c in s.children:
                c.parent_id = s.span_id
    out: list[bytes] = []
    byte = _BYTE
    pack_q, pack_d = _pack_q, _pack_d
    for s in spans:
        head = _heads.get((s.name, s.kind))
        if head is None:
            head = _ld(b"\x2a", s.name.encode()) + b"\x30" + byte[s.kind] + b"\x39"
            if len(_heads) < CACHE_MAX:  # route and model names: bounded by the config
                _heads[(s.name, s.kind)] = head
        parts = [b"\x0a\x10", s.trace_id, b"\x12\x08", s.span_id]
        if s.tracestate:
            parts.append(_ld(b"\x1a", s.tracestate.encode()))
        if s.parent_id:
            parts += (b"\x22\x08", s.parent_id)
        parts += (head, pack_q(s.start_ns), b"\x41", pack_q(s.end_ns))
        for shape, values in s.attrs:
            cache = shape._cache
            if cache is not None:
                hit = cache.get(values)
                parts.append(hit if hit is not None else shape.encode(values))
                continue
            for k, v in zip(shape._keys, values, strict=True):
                if v is None:
                    continue
                cls = v.__class__ if len(k) < 0x70 else None  # a long key: every length below fits one byte
                if cls is str:
                    b = v.encode()
                    n = len(b)
                    total = len(k) + n + 4
                    if total < 0x80:  # a short string: every length fits one byte
                        parts += (b"J", byte[total], k, b"\x12", byte[n + 2], b"\n", byte[n], b)
                        continue
                elif cls is int:
                    if 0 <= v < 0x80:
                        parts += (b"J", byte[len(k) + 4], k, b"\x12\x02\x18", byte[v])
                        continue
                    if 0 <= v < 0x4000:  # a port, a token count: two varint bytes
                        parts += (b"J", byte[len(k) + 5], k, b"\x12\x03\x18", byte[(v & 0x7F) | 0x80], byte[v >> 7])
                        continue
                elif cls is float:
                    parts += (b"J", byte[len(k) + 11], k, b"\x12\x09\x21", pack_d(v))
                    continue
                elif cls is bool:
                    parts += (b"J", byte[len(k) + 4], k, b"\x12\x02\x10\x01" if v else b"\x12\x02\x10\x00")
                    continue
                elif cls is tuple:
                    arr = _array(v)
                    n = len(arr)
                    if n < 0x70 and len(k) + n + 6 < 0x80:  # a few finish reasons, candidates, scores
                        parts += (b"J", byte[len(k) + n + 4], k, b"\x12", byte[n + 2], b"\x2a", byte[n], arr)
                        continue
                parts.append(_field(k, v))
        if s.status_code:
            message = s.status_message
            status = (_ld(b"\x12", message.encode()) if message else b"") + b"\x18" + byte[s.status_code]
            parts.append(_ld(b"\x7a", status))
        body = b"".join(parts)
        n = len(body)
        out += (b"\x12", byte[n] if n < 0x80 else varint(n), body)
    return b"".join(out), len(spans)


def encode_span(s: LiteSpan) -> bytes:
    """One span with those that ended inside it, as `spans` fields (encode_trace without the count)."""
    return encode_trace(s)[0]


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
