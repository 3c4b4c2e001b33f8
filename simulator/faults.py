"""Fault switches for the simulator: failed requests, added latency, stalled streams, crashes.

Set from CLI flags at start and changed at run time through `/admin/faults`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class Faults:
    """`fail_next` requests fail with `fail_status`; every request waits `latency_ms` before its
    first token; every stream stalls (held open) after `stall_after` tokens while set; the next
    generation exits the process after `exit_after` tokens; `/metrics` answers after `metrics_delay_ms`
    (a slow scrape: the replica serves, its load figures arrive late or not at all)."""

    fail_next: int = 0
    fail_status: int = 500
    latency_ms: float = 0.0
    stall_after: int | None = None
    exit_after: int | None = None
    metrics_delay_ms: float = 0.0

    def take_failure(self) -> int | None:
        """The status to fail this request with, consuming one of `fail_next`."""
        if self.fail_next <= 0:
            return None
        self.fail_next -= 1
        return self.fail_status

    def take_exit(self) -> int | None:
        """`exit_after` for this request, once: the switch clears when claimed."""
        k, self.exit_after = self.exit_after, None
        return k

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def update(self, changes: dict[str, Any]) -> None:
        """Apply a partial update, validating every field first (ValueError names the field)."""
        known = {f.name for f in fields(self)}
        clean: dict[str, Any] = {}
        for key, value in changes.items():
            if key not in known:
                raise ValueError(f"unknown fault {key!r}; known: {', '.join(sorted(known))}")
            if key in ("latency_ms", "metrics_delay_ms"):
                if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                    raise ValueError(f"{key} must be a non-negative number")
            elif key == "fail_status":
                if isinstance(value, bool) or not isinstance(value, int) or not 400 <= value <= 599:
                    raise ValueError("fail_status must be an HTTP error status (400-599)")
            elif (value is not None or key == "fail_next") and (
                    isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{key} must be a non-negative integer")
            clean[key] = value
        for key, value in clean.items():
            setattr(self, key, value)
