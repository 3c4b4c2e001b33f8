"""The hand-written OTLP encoding, decoded by opentelemetry-proto itself (the collector's view)."""
from __future__ import annotations

from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from gateway.telemetry.otlp import encode_request, resource_prefix
from gateway.telemetry.spans import CLIENT, SERVER, LiteRecorder, LiteSpan, parse_traceparent, sampler
from tests.support.otlp_receiver import _value


def _spans(n: int = 1, **attrs: Any) -> list[LiteSpan]:
    out: list[LiteSpan] = []
    rec = LiteRecorder(sampler("always_on", 1.0), out.append)
    parent = parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "congo=t61rcWkgMzE")
    for i in range(n):
        span = rec.start(f"chat m{i % 2}", CLIENT, dict(attrs), parent)
        span.end()
    return out


def _decode(body: bytes) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    req.ParseFromString(body)
    return req


def test_every_field_and_value_type_survives_the_round_trip() -> None:
    attrs = {"s": "héllo ☃", "b": True, "f": False, "i": 42, "neg": -7, "big": 2**62, "d": 0.25,
             "strs": ["stop", "length"], "nums": [0.5, 1.5], "empty": ""}
    spans = _spans(1, **attrs)
    spans[0].set_error("upstream said no")
    spans[0].set_attribute("later", "set after start")
    body = encode_request(spans, resource_prefix({"service.name": "svc", "k": "v"}, "gravity", "1.0"))
    req = _decode(body)
    rs = req.resource_spans[0]
    assert {kv.key: _value(kv.value) for kv in rs.resource.attributes} == {"service.name": "svc", "k": "v"}
    assert rs.scope_spans[0].scope.name == "gravity" and rs.scope_spans[0].scope.version == "1.0"
    (s,) = rs.scope_spans[0].spans
    src = spans[0]
    assert s.trace_id.hex() == "0af7651916cd43dd8448eb211c80319c" and s.parent_span_id.hex() == "b7ad6b7169203331"
    assert s.span_id == src.span_id and len(s.span_id) == 8
    assert s.trace_state == "congo=t61rcWkgMzE"
    assert s.name == "chat m0" and s.kind == CLIENT
    assert s.start_time_unix_nano == src.start_ns and s.end_time_unix_nano == src.end_ns >= src.start_ns
    assert {kv.key: _value(kv.value) for kv in s.attributes} == {**attrs, "later": "set after start"}
    assert s.status.code == 2 and s.status.message == "upstream said no"


def test_many_spans_through_the_attribute_cache_decode_alike() -> None:
    spans = _spans(300, model="m", endpoint="sim-0", choices=1)
    prefix = resource_prefix({"service.name": "svc"}, "gravity")
    req = _decode(encode_request(spans, prefix))
    got = req.resource_spans[0].scope_spans[0].spans
    assert len(got) == 300 and {s.name for s in got} == {"chat m0", "chat m1"}
    assert all({kv.key: _value(kv.value) for kv in s.attributes} == {"model": "m", "endpoint": "sim-0", "choices": 1}
               for s in got)
    assert len({s.span_id for s in got}) == 300
    # Two encoded requests concatenated are one request holding both (how export slices are joined).
    both = _decode(encode_request(spans[:10], prefix) + encode_request(spans[10:20], prefix))
    assert sum(len(ss.spans) for rs in both.resource_spans for ss in rs.scope_spans) == 20


def test_a_root_span_has_no_parent_and_no_status_when_ok() -> None:
    out: list[LiteSpan] = []
    span = LiteRecorder(sampler("always_on", 1.0), out.append).start("POST /v1/x", SERVER, None, None)
    span.end()
    span.end()  # ending twice sends it once
    (s,) = _decode(encode_request(out, resource_prefix({}, "gravity"))).resource_spans[0].scope_spans[0].spans
    assert s.parent_span_id == b"" and s.status.code == 0 and s.kind == SERVER and len(s.trace_id) == 16
    assert len(out) == 1


def test_strings_of_every_length_across_the_one_byte_length_boundary_decode() -> None:
    # Short strings take a path that writes their three lengths as single bytes: the boundary is where
    # a length stops fitting in one byte (127), for the string and for the fields around it.
    attrs = {f"k{n}": "é" * (n // 2) + "x" * (n % 2) for n in range(300)}
    spans = _spans(1, **attrs)
    req = _decode(encode_request(spans, resource_prefix({}, "gravity")))
    (s,) = req.resource_spans[0].scope_spans[0].spans
    assert {kv.key: _value(kv.value) for kv in s.attributes} == attrs


def test_shapes_encode_their_values_once_and_skip_absent_ones() -> None:
    from gateway.telemetry.otlp import Shape

    shape = Shape("a", "b", "c", cached=True)
    out: list[LiteSpan] = []
    rec = LiteRecorder(sampler("always_on", 1.0), out.append)
    for _ in range(3):
        span = rec.start("x", SERVER, None, None)
        span.record(shape, ("one", None, ("p", "q")))
        span.record(Shape("d", "e"), (1.5, True))
        span.end()
    req = _decode(encode_request(out, resource_prefix({}, "gravity")))
    got = [{kv.key: _value(kv.value) for kv in s.attributes} for s in req.resource_spans[0].scope_spans[0].spans]
    assert got == [{"a": "one", "c": ["p", "q"], "d": 1.5, "e": True}] * 3
    assert shape.pairs(("one", None, ("p", "q"))) == {"a": "one", "c": ["p", "q"]}
