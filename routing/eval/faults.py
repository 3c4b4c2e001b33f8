"""Faults in virtual time: replicas killed, restarted, stalled or answering errors, and the gateway's answer.

The answer is the production one: each request's attempts are driven by the same pure state machine
the gateway's Dispatcher drives (policies/attempts.py), with the same circuit breakers and retry budget
(policies/circuit.py, policies/retry_budget.py) and the gateway's default resilience config, so a
simulated failover makes the decisions a real one would. Trace lines with a ``fault`` key are events:

``{"t": s, "fault": "kill", "endpoint": 1}``: the replica dies; its streams break, connections are refused.
``{"t": s, "fault": "restart", "endpoint": 1}``: it comes back with an empty cache (a kill first if alive).
``{"t": s, "fault": "stall", "endpoint": 1, "duration": 30}``: it stops producing tokens (until a restart
without ``duration``); the gateway notices after its stall or first-byte timeout.
``{"t": s, "fault": "error", "endpoint": 1, "status": 500, "count": 20}``: it answers ``status`` to the
next ``count`` attempts (or to every attempt for ``duration`` s).
"""
from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from policies.attempts import Attempt, AttemptPlan, AttemptPolicy, Failure, Stop
from policies.circuit import OPEN, CircuitBoard
from policies.resilience import ResilienceConfig
from policies.retry_budget import RetryBudget
from routing.datastore import Datastore, InflightTicket
from routing.errors import RoutingError
from routing.eval.trace import TraceRecord
from routing.scheduler import Scheduler
from routing.types import Decision, RoutingRequest
from simulator.engine import Engine, SimRequest, StepOutcome

if TYPE_CHECKING:
    from routing.eval.cluster import ClusterResult, EndpointRecord, RequestRecord

__all__ = ["CONNECT_REFUSED_S", "ERROR_REPLY_S", "FaultEvent", "FaultInjector", "fault_summary", "parse_fault",
           "read_trace_with_faults"]

FaultKind = Literal["kill", "restart", "stall", "error"]
_KINDS = ("kill", "restart", "stall", "error")

CONNECT_REFUSED_S = 0.001
"""What a refused connection costs an attempt (loopback-like; a remote host adds its round trip)."""
ERROR_REPLY_S = 0.005
"""What an error answer costs an attempt (the replica answers before doing any work)."""


@dataclass(frozen=True)
class FaultEvent:
    t: float
    fault: FaultKind
    endpoint: int
    """Index of the replica (``sim-<endpoint>``)."""
    duration: float | None = None
    """stall, error: how long it lasts (None: a stall lasts until a restart; an error for ``count``)."""
    status: int = 500
    """error: the status answered."""
    count: int | None = None
    """error: how many attempts get it (None with a duration: all of them)."""

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "fault") -> FaultEvent:
        kind = data.get("fault")
        if kind not in _KINDS:
            raise ValueError(f"{where}: 'fault' must be one of {', '.join(_KINDS)}, not {kind!r}")
        unknown = set(data) - {"t", "fault", "endpoint", "duration", "status", "count"}
        if unknown:
            raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
        try:
            event = cls(t=float(data["t"]), fault=kind, endpoint=int(data["endpoint"]),
                        duration=None if data.get("duration") is None else float(data["duration"]),
                        status=int(data.get("status", 500)),
                        count=None if data.get("count") is None else int(data["count"]))
        except KeyError as exc:
            raise ValueError(f"{where}: needs {exc.args[0]!r}") from None
        if event.endpoint < 0 or event.t < 0:
            raise ValueError(f"{where}: 't' and 'endpoint' must not be negative")
        if kind == "error" and not 400 <= event.status <= 599:
            raise ValueError(f"{where}: 'status' must be an HTTP error status")
        if kind == "error" and event.count is None and event.duration is None:
            raise ValueError(f"{where}: an error fault needs 'count' or 'duration'")
        return event


def parse_fault(text: str) -> FaultEvent:
    """One fault from its JSON text (``gravity eval --fault``)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--fault {text!r}: not JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--fault {text!r}: must be a JSON object")  # noqa: TRY004 - the CLI's error type
    return FaultEvent.from_json(data, f"--fault {text!r}")


def read_trace_with_faults(path: str | Path) -> tuple[list[TraceRecord], list[FaultEvent]]:
    """A trace's requests and its fault events (lines with a ``fault`` key), each sorted by time."""
    records: list[TraceRecord] = []
    faults: list[FaultEvent] = []
    with Path(path).open() as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                if isinstance(data, dict) and "fault" in data:
                    faults.append(FaultEvent.from_json(data, f"{path}:{i}"))
                else:
                    records.append(TraceRecord.from_json(data, i))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{i}: {exc}") from exc
    records.sort(key=lambda r: r.t)
    faults.sort(key=lambda f: f.t)
    return records, faults


@dataclass
class _Replica:
    dead: bool = False
    stalled: bool = False
    stall_epoch: int = 0
    restarted: bool = False
    """Came back since the last scrape: the scrape tells the datastores it restarted (empty cache)."""
    error_status: int = 500
    error_count: float = 0.0
    error_until: float = -math.inf


@dataclass(eq=False)
class _Flight:
    """One request with its attempt plan; the current attempt runs as engine request ``sim_id``."""

    rec: RequestRecord
    req: RoutingRequest
    record: TraceRecord
    ids: list[int]
    decision: Decision
    plan: AttemptPlan
    scheduler: Scheduler
    produced: list[int] = field(default_factory=list)
    """Output tokens the client already has (over every attempt)."""
    attempt: Attempt | None = None
    sim_id: str = ""
    ticket: InflightTicket | None = None
    ds: Datastore | None = None
    attempt_first: bool = False
    """The current attempt produced its first token."""
    last_progress: float = 0.0


class FaultInjector:
    """The cluster's dispatch while faults are simulated (routing/eval/cluster.py hands requests here).

    ``schedule(t, fn)`` runs ``fn`` at virtual time ``t``; ``kick(name)`` starts a step on an idle
    engine; ``new_engine(name)`` builds a replica's engine afresh (a restart).
    """

    def __init__(self, faults: Sequence[FaultEvent], *, names: Sequence[str], engines: dict[str, Engine],
                 stores: Sequence[Datastore], schedulers: Sequence[Scheduler], clock: Callable[[], float],
                 schedule: Callable[[float, Callable[[], None]], None], kick: Callable[[str], None],
                 new_engine: Callable[[str], Engine], per_endpoint: Mapping[str, EndpointRecord],
                 sessions: dict[str, str], latencies: list[float],
                 resilience: ResilienceConfig | None = None, resume: bool = True) -> None:
        self._names = list(names)
        self._engines = engines
        self._stores = list(stores)
        self._schedulers = list(schedulers)
        self._clock = clock
        self._schedule = schedule
        self._kick = kick
        self._new_engine = new_engine
        self._per_ep = per_endpoint
        self._sessions = sessions
        self._latencies = latencies
        self.resilience = resilience or ResilienceConfig()
        self.resume = resume
        self._replicas = {n: _Replica() for n in names}
        self._flights: dict[str, _Flight] = {}
        """By the engine request id of their current attempt."""
        self._policies: dict[str, AttemptPolicy] = {}
        self.circuits = CircuitBoard(self.resilience.circuit_policy(), clock, self._circuit_changed,
                                     population=len(self._names))
        for store in self._stores:
            store.add_restart_listener(self.circuits.forget)
        self.budget = RetryBudget(self.resilience.budget_policy())
        self.pending = 0
        """Fault events and timers not yet run (the cluster keeps scraping while any are)."""
        for event in faults:
            if event.endpoint >= len(self._names):
                raise ValueError(f"fault at t={event.t}: endpoint {event.endpoint} does not exist "
                                 f"({len(self._names)} backends)")
            self._at(event.t, functools.partial(self._apply, event))

    # -- hooks the cluster calls -------------------------------------------------------------------
    def runs(self, name: str) -> bool:
        """May ``name``'s engine step now (not dead, not stalled)?"""
        r = self._replicas[name]
        return not (r.dead or r.stalled)

    def scraped(self, name: str) -> bool:
        """A scrape reaches ``name``: False (and out of routing) when nothing listens there."""
        r = self._replicas[name]
        if r.dead:
            for store in self._stores:
                store.set_healthy(name, False, "scrape refused")
            return False
        if r.restarted:
            r.restarted = False
            for store in self._stores:
                store.on_restart(name)
                store.set_healthy(name, True)
        return True

    def busy(self) -> bool:
        return bool(self._flights) or self.pending > 0

    def arrive(self, i: int, rec: RequestRecord, req: RoutingRequest, record: TraceRecord, ids: list[int]) -> None:
        scheduler = self._schedulers[i % len(self._schedulers)]
        ds = self._stores[i % len(self._stores)]
        self.circuits.refresh()  # as Pipeline.route: open circuits whose back-off is over take a probe
        try:
            decision = scheduler.schedule(req)
        except RoutingError as exc:
            rec.shed = exc.code
            return
        self._latencies.append(decision.latency_s)
        plan = AttemptPlan([c.endpoint for c in decision.ranked], self._policy(record.model), self._clock(),
                           self.budget, self.circuits, resumable=self.resume)
        flight = _Flight(rec, req, record, ids, decision, plan, scheduler, ds=ds)
        self._act(flight, plan.start())

    def step_done(self, name: str, outcome: StepOutcome) -> None:
        for ev in outcome.events:
            f = self._flights.get(ev.request_id)
            if f is None:  # an attempt the gateway already gave up on (killed, stalled out)
                continue
            rec = f.rec
            f.produced += ev.token_ids
            rec.output_tokens += len(ev.token_ids)
            f.last_progress = ev.time
            if ev.is_first:
                f.attempt_first = True
                if rec.ttft is None:
                    rec.ttft = ev.time - rec.arrival
                    rec.cached_tokens = ev.num_cached_tokens
                if f.ds is not None and f.ticket is not None:
                    f.ds.first_token(f.ticket)
            if ev.finished:
                rec.e2e = ev.time - rec.arrival
                self._end_attempt(f)
                f.plan.succeeded()

    # -- the attempt loop, as the Dispatcher runs it ---------------------------------------------------
    def _policy(self, model: str) -> AttemptPolicy:
        policy = self._policies.get(model)
        if policy is None:
            policy = self._policies[model] = self.resilience.attempt_policy(model)
        return policy

    def _act(self, f: _Flight, action: Attempt | Stop) -> None:
        if isinstance(action, Stop):
            f.rec.failed = action.reason.value
            return
        f.attempt = action
        f.attempt_first = False
        f.rec.attempts += 1
        if action.resume:
            f.rec.resumes += 1
        name = action.endpoint
        r = self._replicas[name]
        now = self._clock()
        if r.dead:
            self._at(now + CONNECT_REFUSED_S, lambda: self._refused(f, action))
            return
        if r.error_count > 0 or now < r.error_until:
            if r.error_count > 0:
                r.error_count -= 1
            self._at(now + ERROR_REPLY_S, lambda: self._failed(f, Failure.STATUS, status=r.error_status))
            return
        self._submit(f, action, now)

    def _submit(self, f: _Flight, attempt: Attempt, now: float) -> None:
        name, rec, record = attempt.endpoint, f.rec, f.record
        n = len(f.produced)
        f.sim_id = rec.request_id if attempt.number == 1 else f"{rec.request_id}/{attempt.number}"
        cand = next((c for c in f.decision.ranked if c.endpoint == name), None)
        # A resume sends the partial output as context and asks for the rest (continue_final_message).
        sim = SimRequest(f.sim_id, f.ids + f.produced, record.max_tokens - n, arrival=now,
                         cache_salt=record.cache_salt, lora=record.lora, output_offset=n)
        try:
            self._engines[name].add_request(sim)
        except ValueError:
            rec.failed = "rejected_by_engine"
            return
        f.scheduler.observe(f.req, name)
        rec.endpoint = name
        self._per_ep[name].requests += 1
        if record.session:
            self._sessions[record.session] = name
        assert f.ds is not None
        f.ticket = f.ds.begin(name, cand.uncached_tokens if cand else 0, record.max_tokens - n)
        f.last_progress = now
        self._flights[f.sim_id] = f
        self._kick(name)
        if self._replicas[name].stalled:
            self._watch(f, f.sim_id, self._replicas[name].stall_epoch)

    def _end_attempt(self, f: _Flight) -> None:
        self._flights.pop(f.sim_id, None)
        if f.ds is not None and f.ticket is not None:
            f.ds.end(f.ticket)
            f.ticket = None

    def _refused(self, f: _Flight, attempt: Attempt) -> None:
        # Nothing listens: out of routing at once (as the Dispatcher does), until a scrape finds it back.
        for store in self._stores:
            store.set_healthy(attempt.endpoint, False, "connect refused")
        self._failed(f, Failure.CONNECT)

    def _failed(self, f: _Flight, failure: Failure, *, status: int | None = None) -> None:
        streamed = bool(f.produced)  # the client's stream started: only a resume can continue it
        self._act(f, f.plan.failed(failure, self._clock(), status=status, streamed=streamed))

    def _break(self, f: _Flight, failure: Failure) -> None:
        """The gateway gives up on the current attempt (the connection died, or the stream stalled)."""
        name = f.attempt.endpoint if f.attempt else ""
        self._end_attempt(f)
        if not self._replicas[name].dead:
            self._engines[name].abort(f.sim_id)
        self._failed(f, failure)

    # -- stall detection: the Dispatcher's first-byte and inter-chunk timeouts -------------------------
    def _watch(self, f: _Flight, sim_id: str, epoch: int) -> None:
        policy = f.plan.policy
        timeout = policy.stall_timeout_s if f.attempt_first else f.plan.first_byte_timeout(f.last_progress)
        self._at(f.last_progress + timeout, lambda: self._watchdog(f, sim_id, epoch))

    def _watchdog(self, f: _Flight, sim_id: str, epoch: int) -> None:
        name = f.attempt.endpoint if f.attempt else ""
        r = self._replicas.get(name)
        if f.sim_id != sim_id or sim_id not in self._flights or r is None or not r.stalled or r.stall_epoch != epoch:
            return  # answered, given up, or the stall is over (a new stall sets new watchdogs)
        policy = f.plan.policy
        timeout = policy.stall_timeout_s if f.attempt_first else f.plan.first_byte_timeout(f.last_progress)
        due = f.last_progress + timeout
        if self._clock() + 1e-9 < due:
            self._at(due, lambda: self._watchdog(f, sim_id, epoch))
            return
        self._break(f, Failure.STALLED if f.attempt_first else Failure.FIRST_BYTE_TIMEOUT)

    # -- fault events ---------------------------------------------------------------------------------
    def _at(self, t: float, fn: Callable[[], None]) -> None:
        self.pending += 1

        def run() -> None:
            self.pending -= 1
            fn()
        self._schedule(t, run)

    def _apply(self, e: FaultEvent) -> None:
        name = self._names[e.endpoint]
        r = self._replicas[name]
        if e.fault == "kill":
            self._kill(name)
        elif e.fault == "restart":
            self._kill(name)
            self._engines[name] = self._new_engine(name)
            self._replicas[name] = _Replica(restarted=True)
            self._kick(name)
        elif e.fault == "stall":
            if r.dead:
                return
            r.stalled = True
            r.stall_epoch += 1
            for sim_id, f in list(self._flights.items()):
                if f.attempt is not None and f.attempt.endpoint == name:
                    self._watch(f, sim_id, r.stall_epoch)
            if e.duration is not None:
                epoch = r.stall_epoch
                self._at(e.t + e.duration, lambda: self._unstall(name, epoch))
        else:
            r.error_status = e.status
            r.error_count = float(e.count) if e.count is not None else 0.0
            r.error_until = e.t + e.duration if e.duration is not None else -math.inf

    def _unstall(self, name: str, epoch: int) -> None:
        r = self._replicas[name]
        if r.stalled and r.stall_epoch == epoch:
            r.stalled = False
            self._kick(name)

    def _kill(self, name: str) -> None:
        r = self._replicas[name]
        if r.dead:
            return
        r.dead = True
        r.stalled = False
        for f in [f for f in self._flights.values() if f.attempt is not None and f.attempt.endpoint == name]:
            self._break(f, Failure.BROKEN)

    def _circuit_changed(self, endpoint: str, state: str) -> None:
        for store in self._stores:
            store.set_circuit_open(endpoint, state == OPEN)


def fault_summary(result: ClusterResult) -> dict[str, Any]:
    """What the faults cost: failed requests (and how), retries, resumes."""
    failed: dict[str, int] = {}
    for r in result.requests:
        if r.failed is not None:
            failed[r.failed] = failed.get(r.failed, 0) + 1
    return {
        "failed": sum(failed.values()),
        "failed_by": failed,
        "truncated": sum(1 for r in result.requests if r.failed is not None and r.output_tokens > 0),
        "retried": sum(1 for r in result.requests if r.attempts - r.resumes > 1),
        "resumed": sum(1 for r in result.requests if r.resumes > 0),
        "attempts": sum(r.attempts for r in result.requests),
    }
