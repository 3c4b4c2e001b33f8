"""The attempt state machine: the retry matrix (failure x phase x attempt budget x deadline x circuits)."""
from __future__ import annotations

import pytest

from policies.attempts import Attempt, AttemptPlan, AttemptPolicy, Failure, Stop, StopReason
from policies.circuit import CircuitBoard, CircuitPolicy
from policies.retry_budget import RetryBudget, RetryBudgetPolicy

POLICY = AttemptPolicy(max_attempts=3, total_timeout_s=10.0, max_resumes=2)


def _plan(candidates: tuple[str, ...] = ("a", "b", "c", "d"), policy: AttemptPolicy = POLICY, **kw: object
          ) -> AttemptPlan:
    return AttemptPlan(list(candidates), policy, 0.0, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("failure", "status", "retried"), [
    (Failure.CONNECT, None, True),
    (Failure.CONNECT_TIMEOUT, None, True),
    (Failure.FIRST_BYTE_TIMEOUT, None, True),
    (Failure.BROKEN, None, True),
    (Failure.STATUS, 500, True),
    (Failure.STATUS, 502, True),
    (Failure.STATUS, 503, True),
    (Failure.STATUS, 504, True),
    (Failure.STATUS, 429, True),
    (Failure.STATUS, 400, False),
    (Failure.STATUS, 404, False),
    (Failure.STATUS, 422, False),
])
def test_before_the_first_byte_retryable_failures_move_to_the_next_candidate(
        failure: Failure, status: int | None, retried: bool) -> None:
    plan = _plan()
    first = plan.start()
    assert isinstance(first, Attempt) and first.endpoint == "a" and first.number == 1
    nxt = plan.failed(failure, 1.0, status=status)
    if retried:
        assert isinstance(nxt, Attempt) and (nxt.endpoint, nxt.number, nxt.resume) == ("b", 2, False)
    else:
        assert nxt == Stop(StopReason.NOT_RETRYABLE, failure, status)


def test_attempts_are_bounded_and_never_repeat_an_endpoint() -> None:
    plan = _plan(("a", "b", "a", "c", "d"))
    seen = []
    action = plan.start()
    while isinstance(action, Attempt):
        seen.append(action.endpoint)
        action = plan.failed(Failure.CONNECT, 1.0)
    assert seen == ["a", "b", "c"]
    assert action == Stop(StopReason.EXHAUSTED, Failure.CONNECT)


def test_candidates_run_out_before_attempts_do() -> None:
    plan = _plan(("a", "b"))
    plan.start()
    assert isinstance(plan.failed(Failure.STATUS, 1.0, status=503), Attempt)
    assert plan.failed(Failure.STATUS, 1.0, status=503) == Stop(StopReason.EXHAUSTED, Failure.STATUS, 503)


def test_the_deadline_stops_retries() -> None:
    plan = _plan()
    plan.start()
    assert plan.failed(Failure.CONNECT, 10.0) == Stop(StopReason.DEADLINE, Failure.CONNECT)
    assert plan.first_byte_timeout(9.5) == pytest.approx(0.5)


def test_the_retry_budget_stops_retries_across_requests() -> None:
    budget = RetryBudget(RetryBudgetPolicy(ratio=0.2, min_per_s=0.0, window_s=10.0))
    outcomes = []
    for i in range(20):
        plan = AttemptPlan(["a", "b"], POLICY, float(i) * 0.1, budget)
        plan.start()
        outcomes.append(plan.failed(Failure.STATUS, i * 0.1, status=503))
    retried = [o for o in outcomes if isinstance(o, Attempt)]
    assert len(retried) == 4  # 20 % of 20 requests
    assert Stop(StopReason.BUDGET, Failure.STATUS, 503) in outcomes
    assert budget.denied == 16


def test_the_budget_refills_as_the_window_moves() -> None:
    budget = RetryBudget(RetryBudgetPolicy(ratio=0.0, min_per_s=0.1, window_s=10.0))  # 1 per window
    assert budget.try_retry(0.0) and not budget.try_retry(5.0)
    assert budget.try_retry(10.5)


def test_open_circuits_are_skipped_and_all_open_is_no_endpoint() -> None:
    now = [0.0]
    board = CircuitBoard(CircuitPolicy(consecutive_failures=1, open_s=5.0), lambda: now[0])
    board.failure("a")
    plan = _plan(("a", "b"), circuits=board)
    first = plan.start()
    assert isinstance(first, Attempt) and first.endpoint == "b"
    board.failure("b")
    assert _plan(("a", "b"), circuits=board).start() == Stop(StopReason.NO_ENDPOINT)


@pytest.mark.parametrize(("status", "opens"), [(429, True), (503, True), (500, True), (400, False), (404, False)])
def test_failures_feed_the_circuit_client_errors_do_not(status: int, opens: bool) -> None:
    board = CircuitBoard(CircuitPolicy(consecutive_failures=2), lambda: 0.0)
    for _ in range(2):
        plan = _plan(("a",), circuits=board)
        plan.start()
        plan.failed(Failure.STATUS, 1.0, status=status)
    assert board.state("a") == ("open" if opens else "closed")


def test_which_statuses_count_against_the_circuit_is_configurable() -> None:
    board = CircuitBoard(CircuitPolicy(consecutive_failures=2), lambda: 0.0)
    policy = AttemptPolicy(circuit_statuses=frozenset({500, 502, 503, 504}))
    for _ in range(3):
        plan = _plan(("a",), policy, circuits=board)
        plan.start()
        plan.failed(Failure.STATUS, 1.0, status=429)
    assert board.state("a") == "closed"


def test_a_half_open_endpoint_takes_one_probe_and_an_abandoned_probe_is_freed() -> None:
    now = [0.0]
    board = CircuitBoard(CircuitPolicy(consecutive_failures=1, open_s=1.0), lambda: now[0])
    board.failure("a")
    now[0] = 1.5
    probe = _plan(("a", "b"), circuits=board)
    assert probe.start() == Attempt("a", 1, False, 11.5 - 1.5)
    other = _plan(("a", "b"), circuits=board)
    first = other.start()
    assert isinstance(first, Attempt) and first.endpoint == "b", "one probe at a time"
    probe.abandoned()
    again = _plan(("a", "b"), circuits=board).start()
    assert isinstance(again, Attempt) and again.endpoint == "a"


@pytest.mark.parametrize("failure", [Failure.STALLED, Failure.BROKEN])
def test_after_the_first_byte_a_stream_resumes_elsewhere_until_resumes_run_out(failure: Failure) -> None:
    plan = _plan(("a", "b", "c", "d"))
    plan.start()
    one = plan.failed(failure, 1.0, streamed=True)
    assert isinstance(one, Attempt) and (one.endpoint, one.resume) == ("b", True)
    two = plan.failed(failure, 2.0, streamed=True)
    assert isinstance(two, Attempt) and (two.endpoint, two.resume) == ("c", True)
    assert plan.failed(failure, 3.0, streamed=True) == Stop(StopReason.EXHAUSTED, failure, streamed=True)


def test_a_stream_that_cannot_be_resumed_stops_at_once() -> None:
    plan = _plan(resumable=False)
    plan.start()
    assert plan.failed(Failure.BROKEN, 1.0, streamed=True) == Stop(StopReason.NOT_RESUMABLE, Failure.BROKEN,
                                                                   streamed=True)
    off = _plan(policy=AttemptPolicy(resume=False))
    off.start()
    assert off.failed(Failure.STALLED, 1.0, streamed=True).reason is StopReason.NOT_RESUMABLE  # type: ignore[union-attr]


def test_a_resume_past_the_deadline_stops() -> None:
    plan = _plan()
    plan.start()
    assert plan.failed(Failure.BROKEN, 11.0, streamed=True) == Stop(StopReason.DEADLINE, Failure.BROKEN,
                                                                    streamed=True)


@pytest.mark.parametrize("streamed", [False, True])
def test_work_a_dying_replica_cut_is_moved_whatever_the_budget(streamed: bool) -> None:
    # A replica that dies takes its whole batch down at once (vLLM runs up to 256 sequences): those
    # requests are not extra load but the load itself, moved. The budget stops retries piling onto
    # backends that answer errors or stall; a broken connection is retried or resumed regardless,
    # bounded per request by max_attempts and max_resumes.
    budget = RetryBudget(RetryBudgetPolicy(ratio=0.0, min_per_s=0.0, window_s=10.0))  # no retries at all
    plan = _plan(budget=budget)
    plan.start()
    nxt = plan.failed(Failure.BROKEN, 1.0, streamed=streamed)
    assert isinstance(nxt, Attempt) and nxt.resume is streamed
    for failure in (Failure.STALLED, Failure.CONNECT) if streamed else (Failure.CONNECT,):
        stalled = _plan(budget=budget)
        stalled.start()
        assert stalled.failed(failure, 1.0, streamed=streamed).reason is StopReason.BUDGET  # type: ignore[union-attr]
