"""W3C trace context in and out, and the samplers' decisions."""
from __future__ import annotations

import pytest

from gateway.telemetry.spans import INTERNAL, LiteRecorder, LiteSpan, RemoteParent, parse_traceparent, sampler

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize("header", [
    "", "garbage", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",   # an all-zero trace id is invalid
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",   # so is an all-zero parent id
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",   # version ff is forbidden
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # version 00 has exactly 4 fields
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bz-01",
])
def test_invalid_traceparents_start_a_new_trace(header: str) -> None:
    assert parse_traceparent(header) is None


def test_a_valid_traceparent_and_a_future_version() -> None:
    p = parse_traceparent(TP.upper().replace("00-", "00-", 1), " vendor=a ")
    assert p is not None and p.trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736" and p.sampled
    assert p.tracestate == "vendor=a"
    later = parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-more")
    assert later is not None and not later.sampled


def _rec(name: str, ratio: float = 1.0) -> tuple[LiteRecorder, list[LiteSpan]]:
    out: list[LiteSpan] = []
    return LiteRecorder(sampler(name, ratio), out.append), out


def test_children_follow_their_parent_and_propagate_its_ids() -> None:
    rec, out = _rec("parentbased_always_on")
    parent = parse_traceparent(TP, "vendor=a")
    span = rec.start("x", INTERNAL, None, parent)
    assert span.is_recording() and span.trace_id == parent.trace_id  # type: ignore[union-attr]
    assert span.traceparent() == f"00-{parent.trace_id.hex()}-{span.span_id.hex()}-01"  # type: ignore[union-attr]
    assert span.tracestate == "vendor=a"
    unsampled = parse_traceparent(TP[:-2] + "00")
    child = rec.start("y", INTERNAL, None, unsampled)
    assert not child.is_recording()
    # Not recorded, but the decision and the trace still reach the backend.
    assert child.traceparent().startswith(f"00-{TP[3:35]}-") and child.traceparent().endswith("-00")
    grandchild = rec.start("z", INTERNAL, None, child)
    assert not grandchild.is_recording()
    child.end()
    assert out == []


def test_ratio_sampling_keeps_about_the_ratio_and_whole_traces() -> None:
    rec, _ = _rec("parentbased_traceidratio", 0.1)
    kept = 0
    for _ in range(4000):
        root = rec.start("root", INTERNAL, None, None)
        child = rec.start("child", INTERNAL, None, root)
        assert child.is_recording() == root.is_recording()
        kept += root.is_recording()
    assert 300 < kept < 500
    assert sampler("always_off", 1.0)(None, b"\xff" * 16) is False
    assert sampler("traceidratio", 1.0)(RemoteParent(b"\x00" * 16, b"\x01" * 8, 0, None), b"\xff" * 16) is True
    assert sampler("traceidratio", 0.0)(None, b"\x00" * 16) is False
