"""Log lines for expected outcomes: one WARNING per kind per interval, with how many were folded in.

An outage makes every request fail the same way; the operator needs to know it happened and how
often, not a traceback per request (tracebacks are for bugs).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["OutcomeLog"]


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
