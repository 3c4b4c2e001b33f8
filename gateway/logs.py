"""The gateway's logs: one access-log line per request, and one WARNING per kind of expected outcome.

An outage makes every request fail the same way; the operator needs to know it happened and how
often, not a traceback per request (tracebacks are for bugs). Access lines carry ids, counts and
timings, never headers, keys, prompts or completions (docs/metrics.md, "Logs").
"""
from __future__ import annotations

import asyncio
import functools
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import orjson

from gateway.telemetry.context import current_trace_id

if TYPE_CHECKING:
    from gateway.exchange import Exchange

__all__ = ["ACCESS_LOGGER", "AccessLog", "GravityHandler", "JsonFormatter", "OutcomeLog", "TextFormatter", "client_trace_id",
           "configure_logging", "trace_id_of"]


class OutcomeLog:
    def __init__(self, logger: logging.Logger, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._interval = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._folded: dict[str, int] = {}

    def note(self, kind: str, message: str, *args: object) -> bool:
        """Log `message` unless `kind` was logged within the interval; True when a line was written."""
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval:
            self._folded[kind] = self._folded.get(kind, 0) + 1
            return False
        if len(self._last) > 1000:  # kinds are codes and backend names, but stay bounded anyway
            self._last.clear()
            self._folded.clear()
        self._last[kind] = now
        folded = self._folded.pop(kind, 0)
        suffix = f" ({folded} more like it in the last {self._interval:g}s)" if folded else ""
        self._log.warning(message + suffix, *args)
        return True


# -- the access log and the process's log format ---------------------------------------------------------

ACCESS_LOGGER = "gravity.access"
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_MAX_FIELD = 128
"""Client-chosen strings (the model name) are cut to this: a log line is not a place to store a body."""


def _traceparent_id(header: str | None) -> str | None:
    if not header:
        return None
    m = _TRACEPARENT.match(header.strip().lower())
    if m is None or m.group(1) == "0" * 32:
        return None
    return m.group(1)


def _current_trace_id() -> str | None:
    return current_trace_id()


def client_trace_id(ex: Exchange) -> str | None:
    """The trace id of the W3C `traceparent` the request came with (the gateway forwards it)."""
    return _traceparent_id(ex.forward_headers.get("traceparent"))


def trace_id_of(ex: Exchange) -> str | None:
    """The request's trace id for its log line: the current span's when tracing records one, else the
    client's `traceparent` (so a line still joins the client's trace with tracing off)."""
    return current_trace_id() or _traceparent_id(ex.forward_headers.get("traceparent"))


def _cut(value: str | None) -> str | None:
    return value if value is None or len(value) <= _MAX_FIELD else value[:_MAX_FIELD] + "…"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


class AccessLog:
    """One line per API request on the `gravity.access` logger, at INFO, whatever the process's level.

    The fields are the gateway's own (ids, tenant, model, endpoint, counts, timings, outcome): never a
    header, a key, a prompt or a completion."""

    def __init__(self, enabled: bool = True, logger: logging.Logger | None = None,
                 trace_id: Callable[[Exchange], str | None] = trace_id_of) -> None:
        self.enabled = enabled
        self._log = logger or logging.getLogger(ACCESS_LOGGER)
        self._trace_id = trace_id
        self._pending: list[tuple[float, str, dict[str, object]]] = []

    def exchange(self, ex: Exchange) -> None:
        """The line of a request the pipeline admitted or refused (an Exchange exists)."""
        if not self.enabled:
            return
        usage = ex.usage
        tokens_in = tokens_out = tokens_cached = None
        if usage:
            tokens_in = _int(usage.get("prompt_tokens"))
            tokens_out = _int(usage.get("completion_tokens"))
            details = usage.get("prompt_tokens_details")
            tokens_cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else None
        started = ex.started
        end = ex.finished_at or time.perf_counter()
        first = ex.first_chunk_at
        model, fallback = ex.model, ex.fallback_from
        fields: dict[str, object] = {
            "request_id": ex.request_id,
            "client_request_id": ex.client_request_id,
            "trace_id": self._trace_id(ex),
            "tenant": ex.tenant,
            "route": ex.route,
            "model": model if len(model) <= _MAX_FIELD else _cut(model),
            "fallback_from": fallback if fallback is None else _cut(fallback),
            "stream": ex.stream,
            "endpoint": ex.backend,
            "attempts": ex.attempts,
            "status": ex.status,
            "outcome": ex.outcome,
            "tokens_in": tokens_in,
            "tokens_out": tokens_out,
            "tokens_cached": tokens_cached,
            "ttft_ms": round((first - started) * 1000, 3) if first is not None else None,
            "duration_ms": round((end - started) * 1000, 3),
        }
        self._emit(f"{ex.route} {ex.status} {ex.outcome}", fields)

    def refused(self, request_id: str, client_request_id: str | None, method: str, path: str, status: int,
                started: float, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        """The line of a request answered before any exchange existed (bad body, unknown route, state CRUD)."""
        if not self.enabled:
            return
        fields: dict[str, object] = {
            "request_id": request_id, "client_request_id": client_request_id,
            "trace_id": _current_trace_id() or _traceparent_id(
                next((v.decode("latin-1") for k, v in headers if k == b"traceparent"), None)),
            "method": method,
            "path": _cut(path), "status": status,
            "outcome": "ok" if status < 400 else "error",
            "duration_ms": _ms(time.perf_counter() - started),
        }
        self._emit(f"{method} {_cut(path)} {status}", fields)

    def _emit(self, message: str, fields: dict[str, object]) -> None:
        pending = self._pending
        pending.append((time.time(), message, fields))
        if len(pending) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no event loop (a tool, a test): write it now
                self.flush()

    def flush(self) -> None:
        """Write the lines queued since the last flush. On the event loop they are written once per
        turn of the loop (one call for all of them), after the responses of that turn went out; the
        composition root flushes what is left at shutdown."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        log = self._log
        if not log.isEnabledFor(logging.INFO):
            return
        handler = _only_handler(log)
        if handler is None:
            for _, message, fields in pending:
                log.info(message, extra={"fields": fields})
            return
        # The process's logging is configure_logging's one handler: the same lines, written straight to
        # it (Logger.info's caller lookup and LogRecord cost ~3x the line itself, once per request).
        line = handler.formatter.line  # type: ignore[union-attr]
        name = log.name
        text = "".join([line(created, "INFO", name, message, fields) + "\n" for created, message, fields in pending])
        handler.acquire()
        try:
            handler.stream.write(text)
            handler.flush()
        finally:
            handler.release()


class GravityHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """configure_logging's handler: with its formatter, the access log may write to it directly."""


def _only_handler(log: logging.Logger) -> GravityHandler | None:
    """The one handler `log`'s records reach, if it is configure_logging's and nothing filters on the way."""
    found: GravityHandler | None = None
    node: logging.Logger | None = log
    while node is not None:
        if node.filters:
            return None
        for h in node.handlers:
            if found is not None or not isinstance(h, GravityHandler) or h.filters or \
                    not isinstance(h.formatter, JsonFormatter | TextFormatter):
                return None
            found = h
        if not node.propagate:
            break
        node = node.parent
    return found


def _int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


class _LineFormatter(logging.Formatter):
    """A record as one `line(...)` of the subclass's format, with the record's `fields` if any."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        exc = self.formatException(record.exc_info) if record.exc_info else None
        return self.line(record.created, record.levelname, record.name, record.getMessage(),
                         fields if isinstance(fields, dict) else None, exc)

    @staticmethod
    def line(created: float, level: str, name: str, msg: str, fields: dict[str, object] | None,
             exc: str | None = None) -> str:
        raise NotImplementedError


class JsonFormatter(_LineFormatter):
    """One JSON object per line: ts, level, logger, msg, the record's `fields` (the access log's), exc."""

    @staticmethod
    def line(created: float, level: str, name: str, msg: str, fields: dict[str, object] | None,
             exc: str | None = None) -> str:
        out: dict[str, object] = {"ts": _iso(created), "level": level, "logger": name, "msg": msg, **(fields or {})}
        if exc:
            out["exc"] = exc
        return orjson.dumps(out, default=str).decode()


class TextFormatter(_LineFormatter):
    """`ts LEVEL logger message key=value ...`, for people reading a terminal."""

    @staticmethod
    def line(created: float, level: str, name: str, msg: str, fields: dict[str, object] | None,
             exc: str | None = None) -> str:
        out = f"{_iso(created)} {level} {name} {msg}"
        if fields:
            out += "".join(f" {k}={_text(v)}" for k, v in fields.items() if v is not None)
        if exc:
            out += "\n" + exc
        return out


def _text(v: object) -> str:
    s = str(v)
    return orjson.dumps(s).decode() if (not s or any(c in s for c in ' "=\n\r\t')) else s


@functools.lru_cache(maxsize=4)
def _second(second: int) -> str:
    """One whole second's text: the lines written within a second share it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def _iso(created: float) -> str:
    return f"{_second(int(created))}.{int(created % 1 * 1000):03d}Z"


def configure_logging(level: str, fmt: str, access_log: bool) -> None:
    """The process's logging: one handler on stderr in `fmt` (json or text) at `level`; the access log at
    INFO on its own logger when on (so `level: warning` keeps it), off otherwise."""
    handler = GravityHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.WARNING))
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO if access_log else logging.CRITICAL + 1)
