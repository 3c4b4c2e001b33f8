from __future__ import annotations

import logging

import pytest

from gateway.logs import OutcomeLog


def test_one_line_per_kind_per_interval_with_the_folded_count(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    log = OutcomeLog(logging.getLogger("t.outcomes"), interval_s=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "t.outcomes"):
        assert log.note("503", "outage %s", "a")
        for _ in range(99):
            assert not log.note("503", "outage %s", "a")
        assert log.note("429", "other kind")
        now[0] = 10.5
        assert log.note("503", "outage %s", "b")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["outage a", "other kind", "outage b (99 more like it in the last 10s)"]
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in caplog.records)
