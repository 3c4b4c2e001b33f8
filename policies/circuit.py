"""Passive health: a circuit breaker per endpoint, fed by the outcomes of real requests.

Closed -> open after `consecutive_failures` failures in a row, or an error rate over
`error_rate` within `window_s` (with at least `min_requests` seen). Open endpoints take no
traffic until `open_s` has passed (doubling on each re-open, up to `max_open_s`); then one
half-open probe is let through: success closes the circuit, failure re-opens it. Pure: the clock
is injected, and a listener hears every state change (the gateway mirrors it into the datastore
and the metrics).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "CircuitBoard", "CircuitPolicy"]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

Listener = Callable[[str, str], None]
"""(endpoint, new state)."""


@dataclass(frozen=True)
class CircuitPolicy:
    consecutive_failures: int = 5
    error_rate: float = 0.5
    window_s: float = 10.0
    min_requests: int = 20
    open_s: float = 2.0
    """First open period; doubled on each re-open without a success between."""
    max_open_s: float = 60.0
    max_open_fraction: float = 0.5
    """Never more than this share of the endpoints open at once (at least one may open): an overload
    that makes every endpoint slow must not take the whole fleet out (Envoy's max_ejection_percent)."""


@dataclass
class _Circuit:
    state: str = CLOSED
    consecutive: int = 0
    outcomes: deque[tuple[float, bool]] = field(default_factory=deque)
    open_until: float = 0.0
    open_for: float = 0.0
    probing: bool = False


class CircuitBoard:
    def __init__(self, policy: CircuitPolicy, clock: Callable[[], float],
                 listener: Listener | None = None, population: int = 0) -> None:
        self.policy = policy
        self._clock = clock
        self._listener = listener
        self._circuits: dict[str, _Circuit] = {}
        self.population = population
        """How many endpoints there are (for `max_open_fraction`; 0: no cap)."""
        self.held_closed = 0
        """Trips not acted on because the cap was reached."""

    def _get(self, endpoint: str) -> _Circuit:
        c = self._circuits.get(endpoint)
        if c is None:
            c = self._circuits[endpoint] = _Circuit()
        return c

    def state(self, endpoint: str) -> str:
        c = self._circuits.get(endpoint)
        if c is None:
            return CLOSED
        if c.state == OPEN and self._clock() >= c.open_until:
            self._set(endpoint, c, HALF_OPEN)
        return c.state

    def refresh(self) -> None:
        """Move every open circuit whose open period is over to half-open (the listener hears it).

        Routing filters out endpoints whose circuit is open, so nothing on the request path would ask
        an open circuit its state again: without this call before routing, no probe would ever reach
        the endpoint and its circuit would stay open for ever.
        """
        now = self._clock()
        for endpoint, c in self._circuits.items():
            if c.state == OPEN and now >= c.open_until:
                self._set(endpoint, c, HALF_OPEN)

    def allow(self, endpoint: str) -> bool:
        """May a request go to `endpoint` now? In half-open, only one probe at a time."""
        state = self.state(endpoint)
        if state == CLOSED:
            return True
        if state == HALF_OPEN:
            c = self._circuits[endpoint]
            if not c.probing:
                c.probing = True
                return True
        return False

    def release_probe(self, endpoint: str) -> None:
        """A probe that was allowed was never sent (the request ended first)."""
        c = self._circuits.get(endpoint)
        if c is not None:
            c.probing = False

    def success(self, endpoint: str) -> None:
        c = self._get(endpoint)
        c.consecutive = 0
        c.probing = False
        self._record(c, True)
        if c.state != CLOSED:
            c.open_for = 0.0
            self._set(endpoint, c, CLOSED)

    def failure(self, endpoint: str) -> None:
        c = self._get(endpoint)
        c.consecutive += 1
        c.probing = False
        self._record(c, False)
        p = self.policy
        if c.state == CLOSED and self._tripped(c) and not self._may_open():
            self.held_closed += 1
            return
        if c.state == HALF_OPEN or (c.state == CLOSED and self._tripped(c)):
            c.open_for = min(p.max_open_s, c.open_for * 2 if c.open_for else p.open_s)
            c.open_until = self._clock() + c.open_for
            self._set(endpoint, c, OPEN)

    def forget(self, endpoint: str) -> None:
        """The endpoint restarted or was removed: its history says nothing about it now."""
        c = self._circuits.pop(endpoint, None)
        if c is not None and c.state != CLOSED and self._listener is not None:
            self._listener(endpoint, CLOSED)

    def _may_open(self) -> bool:
        if self.population <= 0:
            return True
        opened = sum(1 for c in self._circuits.values() if c.state != CLOSED)
        return opened < max(1, int(self.population * self.policy.max_open_fraction))

    def _record(self, c: _Circuit, ok: bool) -> None:
        now = self._clock()
        c.outcomes.append((now, ok))
        horizon = now - self.policy.window_s
        while c.outcomes and c.outcomes[0][0] <= horizon:
            c.outcomes.popleft()

    def _tripped(self, c: _Circuit) -> bool:
        p = self.policy
        if c.consecutive >= p.consecutive_failures:
            return True
        n = len(c.outcomes)
        if n < p.min_requests:
            return False
        failed = sum(1 for _, ok in c.outcomes if not ok)
        return failed / n >= p.error_rate

    def _set(self, endpoint: str, c: _Circuit, state: str) -> None:
        if c.state == state:
            return
        c.state = state
        if state == CLOSED:
            c.outcomes.clear()
        if self._listener is not None:
            self._listener(endpoint, state)
