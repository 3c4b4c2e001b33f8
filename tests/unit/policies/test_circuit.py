from __future__ import annotations

from policies.circuit import CLOSED, HALF_OPEN, OPEN, CircuitBoard, CircuitPolicy


def _board(**kw: float) -> tuple[CircuitBoard, list[float], list[tuple[str, str]]]:
    now = [0.0]
    changes: list[tuple[str, str]] = []
    policy = CircuitPolicy(**{"consecutive_failures": 3, "open_s": 1.0, "max_open_s": 4.0, **kw})  # type: ignore[arg-type]
    return CircuitBoard(policy, lambda: now[0], lambda e, s: changes.append((e, s))), now, changes


def test_consecutive_failures_open_and_a_success_resets_the_count() -> None:
    board, _, changes = _board()
    board.failure("a")
    board.failure("a")
    board.success("a")
    board.failure("a")
    board.failure("a")
    assert board.state("a") == CLOSED
    board.failure("a")
    assert board.state("a") == OPEN and not board.allow("a")
    assert changes == [("a", OPEN)]


def test_an_error_rate_over_the_window_opens_even_without_a_streak() -> None:
    board, now, _ = _board(consecutive_failures=100, error_rate=0.5, min_requests=10, window_s=10.0)
    for i in range(10):
        now[0] = i * 0.1
        (board.failure if i % 2 else board.success)("a")
    assert board.state("a") == OPEN


def test_old_outcomes_leave_the_window() -> None:
    board, now, _ = _board(consecutive_failures=100, error_rate=0.5, min_requests=4, window_s=1.0)
    board.failure("a")
    board.failure("a")
    now[0] = 5.0
    board.success("a")
    board.success("a")
    board.failure("a")
    assert board.state("a") == CLOSED


def test_half_open_probe_closes_on_success_and_reopens_longer_on_failure() -> None:
    board, now, changes = _board(consecutive_failures=1)
    board.failure("a")
    now[0] = 0.5
    assert not board.allow("a")
    now[0] = 1.0
    assert board.state("a") == HALF_OPEN
    assert board.allow("a") and not board.allow("a")
    board.failure("a")  # the probe failed: open again, twice as long
    now[0] = 2.9
    assert board.state("a") == OPEN
    now[0] = 3.0
    assert board.allow("a")
    board.success("a")
    assert board.state("a") == CLOSED and board.allow("a")
    assert changes == [("a", OPEN), ("a", HALF_OPEN), ("a", OPEN), ("a", HALF_OPEN), ("a", CLOSED)]


def test_back_off_is_capped_and_a_restart_forgets_the_history() -> None:
    board, now, changes = _board(consecutive_failures=1)
    for _ in range(6):
        board.failure("a")
        now[0] += 10
        board.allow("a")
    board.failure("a")
    opened_at = now[0]
    now[0] = opened_at + 3.9
    assert board.state("a") == OPEN
    now[0] = opened_at + 4.0
    assert board.state("a") == HALF_OPEN
    board.forget("a")
    assert board.state("a") == CLOSED and changes[-1] == ("a", CLOSED)


def test_an_overload_cannot_open_more_than_the_cap() -> None:
    board, _, _ = _board(consecutive_failures=1, max_open_fraction=0.5)
    board.population = 4
    for e in "abcd":
        board.failure(e)
    assert [board.state(e) for e in "abcd"] == [OPEN, OPEN, CLOSED, CLOSED]
    assert board.held_closed == 2
    board.population = 3  # at least one may always open
    other, _, _ = _board(consecutive_failures=1, max_open_fraction=0.1)
    other.population = 3
    for e in "abc":
        other.failure(e)
    assert [other.state(e) for e in "abc"] == [OPEN, CLOSED, CLOSED]


def test_refresh_turns_open_circuits_half_open_by_time_alone() -> None:
    # Routing never offers an open endpoint, so nobody asks its circuit: refresh() must move it by time.
    board, now, changes = _board(consecutive_failures=1)
    board.failure("a")
    board.failure("b")
    now[0] = 0.99
    board.refresh()
    assert changes == [("a", OPEN), ("b", OPEN)]
    now[0] = 1.0
    board.refresh()
    assert changes[2:] == [("a", HALF_OPEN), ("b", HALF_OPEN)]
    board.refresh()
    assert len(changes) == 4, "a half-open circuit is not announced twice"
    assert board.allow("a") and not board.allow("a"), "still one probe at a time"
