"""Request priority and load shedding: refuse `sheddable` work at once when every endpoint is saturated.

`critical` and `standard` requests are never shed here; they queue at the backends as usual.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from policies.config import PRIORITY_RANK, Priority, PriorityConfig
from policies.errors import InvalidPriority

__all__ = ["PRIORITIES", "EndpointLoad", "resolve_priority", "saturated", "should_shed"]

PRIORITIES: tuple[Priority, ...] = ("critical", "standard", "sheddable")


class _Metrics(Protocol):
    @property
    def waiting(self) -> int: ...


class EndpointLoad(Protocol):
    """What shedding reads of an endpoint (routing's `EndpointView` has this shape)."""

    @property
    def healthy(self) -> bool: ...

    @property
    def circuit_open(self) -> bool: ...

    @property
    def inflight_requests(self) -> int: ...

    def serves(self, model: str) -> bool: ...

    def trusted_metrics(self) -> _Metrics | None: ...


def resolve_priority(header: str | None, default: Priority, maximum: Priority | None = None) -> Priority:
    """The header's priority, lowered to `maximum` when it asks for more (None: no cap), else `default`.

    Lowering is silent, as a client asking for more than its key allows is not an error of its
    request: it runs at the highest priority it may have."""
    if header is None or header == "":
        return default
    value = header.strip().lower()
    if value not in PRIORITIES:  # narrows value to Priority for the return below
        raise InvalidPriority(f"Invalid x-gravity-priority {header[:32]!r}: expected one of "
                              f"{', '.join(PRIORITIES)}.")
    if maximum is not None and PRIORITY_RANK[value] > PRIORITY_RANK[maximum]:
        return maximum
    return value


def saturated(e: EndpointLoad, cfg: PriorityConfig) -> bool:
    m = e.trusted_metrics()
    if m is not None and m.waiting >= cfg.shed_waiting_threshold:
        return True
    return cfg.shed_inflight_threshold is not None and e.inflight_requests >= cfg.shed_inflight_threshold


def should_shed(priority: Priority, model: str, endpoints: Iterable[EndpointLoad], cfg: PriorityConfig) -> bool:
    """True when the request may be shed and every eligible endpoint is saturated.

    With no eligible endpoint there is nothing to protect: routing answers that case itself.
    """
    if priority != "sheddable" or not cfg.shed:
        return False
    eligible = [e for e in endpoints if e.healthy and not e.circuit_open and e.serves(model)]
    return bool(eligible) and all(saturated(e, cfg) for e in eligible)
