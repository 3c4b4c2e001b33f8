"""The attempt state machine of one request: which endpoint next, and whether a failure is retried.

Pure and synchronous, with time passed in: the async proxy drives it with real I/O and the
virtual-time evaluator with its event heap, so failover is simulated with the decisions that run in
production. Events go in (`start`, `failed`, `succeeded`), the next action comes out (`Attempt` or
`Stop`). See docs/resilience.md for the fault matrix.

Rules: never the same endpoint twice within a request; endpoints whose circuit refuses are skipped;
before the first byte a retryable failure moves to the next candidate while attempts, the
deadline and the gateway's retry budget allow; after the stream started, a stall or a broken stream
resumes on another endpoint when the request can be resumed and resumes are left. A broken
connection (a replica dying under its batch) is retried or resumed without asking the budget.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from policies.retry_budget import RetryBudget

__all__ = ["Attempt", "AttemptPlan", "AttemptPolicy", "Circuits", "Failure", "Stop", "StopReason"]


class Failure(str, Enum):
    CONNECT = "connect"
    """Refused, reset or unreachable before any response byte (a stale pooled connection already
    re-sent once on a fresh one by the transport)."""
    CONNECT_TIMEOUT = "connect_timeout"
    STATUS = "status"
    """The backend answered with an error status."""
    FIRST_BYTE_TIMEOUT = "first_byte_timeout"
    STALLED = "stalled"
    """No byte for the stall timeout after the response started."""
    BROKEN = "broken"
    """The connection died after the response started."""


class StopReason(str, Enum):
    NO_ENDPOINT = "no_endpoint"
    """No candidate may take traffic (all circuits open, or no candidate at all)."""
    EXHAUSTED = "exhausted"
    """Attempts (or candidates, or resumes) are used up."""
    DEADLINE = "deadline"
    BUDGET = "budget"
    """The gateway's retry budget is spent: the fleet is failing, retries would pile on."""
    NOT_RETRYABLE = "not_retryable"
    """A failure that retrying cannot fix (a 400, say): the client gets it as it is."""
    NOT_RESUMABLE = "not_resumable"


@dataclass(frozen=True)
class AttemptPolicy:
    max_attempts: int = 3
    """Endpoints tried before the first byte reaches the client."""
    retry_statuses: frozenset[int] = frozenset({429, 500, 502, 503, 504})
    retry_first_byte_timeout: bool = True
    connect_timeout_s: float = 5.0
    first_byte_timeout_s: float = 120.0
    stall_timeout_s: float = 30.0
    total_timeout_s: float = 600.0
    resume: bool = True
    max_resumes: int = 2
    circuit_statuses: frozenset[int] = frozenset({429, 500, 502, 503, 504})
    """Statuses that count against an endpoint's circuit. A 429 counts too: a replica that refuses at
    once looks idle to load-aware routing and would otherwise draw nearly every request, each paying
    a retry until the retry budget runs dry. Its circuit's short, doubling open period sheds load from
    it; `max_open_fraction` keeps a fleet-wide overload from opening every circuit."""


class Circuits(Protocol):
    """What the plan asks of the circuit breakers (policies/circuit.py's CircuitBoard)."""

    def allow(self, endpoint: str) -> bool: ...

    def success(self, endpoint: str) -> None: ...

    def failure(self, endpoint: str) -> None: ...


@dataclass(frozen=True)
class Attempt:
    endpoint: str
    number: int
    """1 for the first attempt of the request."""
    resume: bool
    """Continue a stream the client already receives (with the partial output as context)."""
    deadline: float
    """When the whole request must be over (the policy's total timeout from the start)."""


@dataclass(frozen=True)
class Stop:
    reason: StopReason
    failure: Failure | None = None
    """The last real failure (None when nothing was tried)."""
    status: int | None = None
    """Its status, for Failure.STATUS."""
    streamed: bool = False
    """The client already received part of the answer."""


@dataclass
class _Tried:
    endpoint: str
    failure: Failure | None = None
    status: int | None = None


@dataclass
class AttemptPlan:
    candidates: Sequence[str]
    """Ranked, best first (the scheduler's decision)."""
    policy: AttemptPolicy
    started_at: float
    budget: RetryBudget | None = None
    circuits: Circuits | None = None
    resumable: bool = True
    """Whether this request can be continued on another endpoint at all (its kind and shape)."""
    tried: list[_Tried] = field(default_factory=list)
    resumes: int = 0
    _next: int = 0

    @property
    def deadline(self) -> float:
        return self.started_at + self.policy.total_timeout_s

    @property
    def attempts(self) -> int:
        return len(self.tried)

    def start(self) -> Attempt | Stop:
        if self.budget is not None:
            self.budget.request(self.started_at)
        return self._advance(resume=False) or Stop(StopReason.NO_ENDPOINT)

    def first_byte_timeout(self, now: float) -> float:
        return max(0.0, min(self.policy.first_byte_timeout_s, self.deadline - now))

    def abandoned(self) -> None:
        """The request ended (the client left) with the current attempt unjudged: free a half-open probe."""
        release = getattr(self.circuits, "release_probe", None)
        if release is not None and self.tried and self.tried[-1].failure is None:
            release(self.tried[-1].endpoint)

    def succeeded(self) -> None:
        """The current attempt delivered its whole answer (a stream: its last event), which closes a
        half-open circuit; a first byte alone proves little when replicas stall mid-stream."""
        if self.circuits is not None and self.tried:
            self.circuits.success(self.tried[-1].endpoint)

    def failed(self, failure: Failure, now: float, *, status: int | None = None,
               streamed: bool = False) -> Attempt | Stop:
        """The current attempt failed: what next."""
        current = self.tried[-1]
        current.failure, current.status = failure, status
        if self.circuits is not None and self._counts_against_circuit(failure, status):
            self.circuits.failure(current.endpoint)
        if streamed:
            return self._resume(failure, now)
        if not self._retryable(failure, status):
            return Stop(StopReason.NOT_RETRYABLE, failure, status)
        if now >= self.deadline:
            return Stop(StopReason.DEADLINE, failure, status)
        if self.attempts >= self.policy.max_attempts:
            return Stop(StopReason.EXHAUSTED, failure, status)
        if not self._budget_allows(failure, now):
            return Stop(StopReason.BUDGET, failure, status)
        return self._advance(resume=False) or Stop(StopReason.EXHAUSTED, failure, status)

    def _resume(self, failure: Failure, now: float) -> Attempt | Stop:
        if not (self.policy.resume and self.resumable):
            return Stop(StopReason.NOT_RESUMABLE, failure, streamed=True)
        if now >= self.deadline:
            return Stop(StopReason.DEADLINE, failure, streamed=True)
        if self.resumes >= self.policy.max_resumes:
            return Stop(StopReason.EXHAUSTED, failure, streamed=True)
        if not self._budget_allows(failure, now):
            return Stop(StopReason.BUDGET, failure, streamed=True)
        attempt = self._advance(resume=True)
        if attempt is None:
            return Stop(StopReason.EXHAUSTED, failure, streamed=True)
        self.resumes += 1
        return attempt

    def _budget_allows(self, failure: Failure, now: float) -> bool:
        # A connection that broke mid-answer is a replica dying under its whole batch (vLLM runs up to
        # 256 sequences): that work is not extra load but the load itself, moved, and the budget's floor
        # (30 per 10 s) would cut most of it. Bounded per request by max_attempts and max_resumes.
        # Everything else asks: errors, refusals and stalls are what a sick fleet answers with.
        if failure is Failure.BROKEN or self.budget is None:
            return True
        return self.budget.try_retry(now)

    def _retryable(self, failure: Failure, status: int | None) -> bool:
        if failure is Failure.STATUS:
            return status in self.policy.retry_statuses
        if failure is Failure.FIRST_BYTE_TIMEOUT:
            return self.policy.retry_first_byte_timeout
        # A connection that died before the client saw a byte loses nothing by being tried elsewhere.
        return failure in (Failure.CONNECT, Failure.CONNECT_TIMEOUT, Failure.BROKEN)

    def _counts_against_circuit(self, failure: Failure, status: int | None) -> bool:
        if failure is Failure.STATUS:
            return status in self.policy.circuit_statuses
        return True

    def _advance(self, *, resume: bool) -> Attempt | None:
        seen = {t.endpoint for t in self.tried}
        while self._next < len(self.candidates):
            endpoint = self.candidates[self._next]
            self._next += 1
            if endpoint in seen:
                continue
            if self.circuits is not None and not self.circuits.allow(endpoint):
                continue
            self.tried.append(_Tried(endpoint))
            return Attempt(endpoint, len(self.tried), resume, self.deadline)
        return None
