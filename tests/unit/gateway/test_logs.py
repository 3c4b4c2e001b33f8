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


# -- the access log's pieces -------------------------------------------------------------------------------
def _exchange(**kw: object) -> object:
    from gateway.exchange import Exchange
    from routing.types import RoutingRequest

    ex = Exchange(request_id="rid", route="chat/completions", model="m", body={}, raw=b"", stream=False,
                  client_wants_usage=False, routing=RoutingRequest(model="m", prompt=b""), forward_headers={})
    for k, v in kw.items():
        setattr(ex, k, v)
    return ex


@pytest.mark.parametrize(("header", "want"), [
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "4bf92f3577b34da6a3ce929d0e0e4736"),
    ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", "4bf92f3577b34da6a3ce929d0e0e4736"),
    ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),  # the invalid all-zero id
    ("00-4bf92f3577b34da6-00f067aa0ba902b7-01", None),
    ("garbage", None),
    (None, None),
])
def test_trace_id_comes_from_a_valid_traceparent_only(header: str | None, want: str | None) -> None:
    from gateway.logs import client_trace_id, trace_id_of

    ex = _exchange(forward_headers={"traceparent": header} if header else {})
    assert client_trace_id(ex) == want  # type: ignore[arg-type]
    assert trace_id_of(ex) == want  # type: ignore[arg-type]  # no span is current here


def test_json_and_text_lines_of_one_access_record(caplog: pytest.LogCaptureFixture) -> None:
    import json

    from gateway.logs import AccessLog, JsonFormatter, TextFormatter

    logger = logging.getLogger("t.access")
    ex = _exchange(model="m" * 500, status=200, outcome="ok", backend="sim-0", attempts=2, tenant="t a",
                   usage={"prompt_tokens": 10, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 8}})
    with caplog.at_level(logging.INFO, "t.access"):
        AccessLog(logger=logger).exchange(ex)  # type: ignore[arg-type]
    (record,) = caplog.records
    line = json.loads(JsonFormatter().format(record))
    assert (line["level"], line["logger"], line["request_id"], line["endpoint"], line["attempts"]) == \
        ("INFO", "t.access", "rid", "sim-0", 2)
    assert (line["tokens_in"], line["tokens_out"], line["tokens_cached"]) == (10, 3, 8)
    assert len(line["model"]) <= 130  # a client-chosen string is cut
    text = TextFormatter().format(record)
    assert " INFO t.access chat/completions 200 ok " in text and ' tenant="t a" ' in text
    assert " tokens_cached=8 " in text and "ttft_ms" not in text  # None fields are left out


def test_an_access_log_turned_off_writes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    from gateway.logs import AccessLog

    with caplog.at_level(logging.INFO, "t.off"):
        AccessLog(enabled=False, logger=logging.getLogger("t.off")).exchange(_exchange())  # type: ignore[arg-type]
        AccessLog(enabled=False, logger=logging.getLogger("t.off")).refused("r", None, "GET", "/v1/x", 404, 0.0)
    assert caplog.records == []


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_the_direct_write_and_the_logging_path_give_the_same_line(fmt: str) -> None:
    import io
    import re

    from gateway.logs import AccessLog, GravityHandler, JsonFormatter, TextFormatter

    def run(handler: logging.Handler, name: str) -> str:
        stream = io.StringIO()
        handler.setStream(stream)  # type: ignore[attr-defined]
        handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = [handler], False
        logger.setLevel(logging.INFO)
        ex = _exchange(status=429, outcome="error", usage={"prompt_tokens": 3})
        AccessLog(logger=logger).exchange(ex)  # type: ignore[arg-type]
        AccessLog(logger=logger).refused("r2", None, "GET", "/v1/nope", 404, 0.0)
        # timestamps and durations differ between the two runs
        return re.sub(r'(\d{4}-\d\d-\d\dT[\d:.]+Z|"duration_ms":[\d.]+|duration_ms=[\d.]+)', "", stream.getvalue())

    direct = run(GravityHandler(), "t.direct")
    through_logging = run(logging.StreamHandler(), "t.direct")
    assert direct == through_logging and direct.count("\n") == 2


async def test_on_the_event_loop_lines_are_written_once_per_loop_turn_in_order() -> None:
    import asyncio
    import io
    import json

    from gateway.logs import AccessLog, GravityHandler, JsonFormatter

    stream = io.StringIO()
    handler = GravityHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("t.batched")
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.INFO)
    access = AccessLog(logger=logger)
    for i in range(3):
        access.exchange(_exchange(status=200 + i, outcome="ok"))  # type: ignore[arg-type]
    access.refused("r9", None, "GET", "/v1/nope", 404, 0.0)
    assert stream.getvalue() == ""  # the request path only queued them
    await asyncio.sleep(0)
    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert [x["status"] for x in lines] == [200, 201, 202, 404]
    access.exchange(_exchange(status=500, outcome="error"))  # type: ignore[arg-type]
    access.flush()  # what shutdown does
    assert stream.getvalue().count("\n") == 5
