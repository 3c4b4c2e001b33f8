"""Split a server-sent-event byte stream into whole events without delaying any of them.

Used to find (and, when the client did not ask for it, drop) the final usage-only chunk.
"""
from __future__ import annotations

from typing import Any

import orjson

_SEPARATORS = (b"\n\n", b"\r\n\r\n")


class EventSplitter:
    """Feed raw chunks; get back the complete events in them (each with its trailing blank line)."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = b""
        """Part of an event, buffered until the next chunk completes it (read-only outside)."""

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self.buf + chunk if self.buf else chunk
        events: list[bytes] = []
        start = 0
        while True:
            cut = buf.find(b"\n\n", start)
            if cut < 0:
                crlf = buf.find(b"\r\n\r\n", start)
                if crlf < 0:
                    break
                end = crlf + 4
            else:
                end = cut + 2
            events.append(buf[start:end])
            start = end
        self.buf = buf[start:]
        return events

    def rest(self) -> bytes:
        """Whatever followed the last separator (a backend that ended without one)."""
        rest, self.buf = self.buf, b""
        return rest


def split_events(raw: bytes) -> list[bytes]:
    """The events in `raw`, which holds whole events (a chunk the relay passed on unsplit)."""
    splitter = EventSplitter()
    events = splitter.feed(raw)
    rest = splitter.rest()
    return [*events, rest] if rest else events


def only_null_usage(chunk: bytes) -> bool:
    """Every `"usage"` in `chunk` is `"usage":null` (backends that send the key on every chunk)."""
    n = chunk.count(b'"usage"')
    return n == 0 or n == chunk.count(b'"usage":null')


def event_json(event: bytes) -> Any | None:
    """The JSON payload of a `data:` event, or None for [DONE], comments and non-JSON data."""
    data = b"".join(
        line[5:].lstrip() for line in event.splitlines() if line.startswith(b"data:")
    )
    if not data or data == b"[DONE]":
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def usage_of(event: bytes) -> tuple[dict[str, Any] | None, bool]:
    """(usage, usage_only) for one event: usage_only marks the extra chunk include_usage adds."""
    if only_null_usage(event):
        return None, False
    payload = event_json(event)
    if not isinstance(payload, dict):
        return None, False
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None, False
    return usage, payload.get("choices") == []
