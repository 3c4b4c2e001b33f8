"""Faults in the virtual-time evaluator: the gateway's attempt state machine under kills, stalls and errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from policies.resilience import ResilienceConfig
from routing.eval.cli import main
from routing.eval.cluster import ClusterResult, simulate
from routing.eval.faults import FaultEvent, fault_summary, parse_fault, read_trace_with_faults
from routing.eval.policies import policy_config
from routing.eval.trace import TraceRecord, write_trace
from simulator.profiles import get_profile

TINY = get_profile("tiny", max_model_len=4096)
MAX_TOKENS = 64


def _records(n: int = 120, gap: float = 0.02) -> list[TraceRecord]:
    return [TraceRecord(t=i * gap, model="m", max_tokens=MAX_TOKENS, prompt=f"unrelated question number {i} " * 8)
            for i in range(n)]


def _run(faults: list[FaultEvent] | None, resume: bool = True, records: list[TraceRecord] | None = None,
         resilience: ResilienceConfig | None = None) -> ClusterResult:
    return simulate(records or _records(), config=lambda reg: policy_config("round-robin", reg), engine=TINY,
                    backends=3, faults=faults, resume=resume, resilience=resilience, policy_name="round-robin")


def test_without_faults_the_attempt_machine_changes_nothing() -> None:
    plain, guarded = _run(None), _run([])
    assert [(r.endpoint, r.ttft, r.e2e) for r in plain.requests] == [(r.endpoint, r.ttft, r.e2e)
                                                                     for r in guarded.requests]
    assert fault_summary(guarded)["attempts"] == len(guarded.requests)


def test_a_replica_killed_mid_load_costs_nothing_with_resume_and_truncates_streams_without() -> None:
    kill = [FaultEvent(t=1.0, fault="kill", endpoint=1)]
    with_resume, without = _run(kill, resume=True), _run(kill, resume=False)
    on, off = fault_summary(with_resume), fault_summary(without)
    assert on["resumed"] >= 3, "the kill broke no stream: the test proved nothing"
    assert on["failed"] == 0
    assert all(r.e2e is not None and r.output_tokens == MAX_TOKENS for r in with_resume.requests)
    # The same streams, not resumed: each ends early with an error (what the client saw: a partial answer).
    assert off["failed"] == off["truncated"] == on["resumed"]
    assert all(0 < r.output_tokens < MAX_TOKENS for r in without.requests if r.failed is not None)
    assert {r.failed for r in without.requests if r.failed} == {"not_resumable"}
    # Requests arriving after the kill never fail: refused connections are retried before the first byte.
    assert all(r.failed is None for r in without.requests if r.arrival > 1.0)
    dead = [r for r in with_resume.requests if r.arrival > 1.2 and r.endpoint == "sim-1"]
    assert not dead, "routing kept sending to the dead replica after a scrape found it gone"


def test_a_restarted_replica_takes_traffic_again() -> None:
    result = _run([FaultEvent(t=0.5, fault="kill", endpoint=1), FaultEvent(t=1.0, fault="restart", endpoint=1)])
    assert fault_summary(result)["failed"] == 0
    assert any(r.endpoint == "sim-1" and r.arrival > 1.2 for r in result.requests)


def test_an_error_burst_is_retried_elsewhere_and_opens_the_circuit() -> None:
    result = _run([FaultEvent(t=0.2, fault="error", endpoint=0, status=503, count=1000)])
    summary = fault_summary(result)
    assert summary["failed"] == 0 and summary["retried"] >= 5
    # Five failures in a row open the circuit (defaults): later requests mostly skip sim-0 (probes only).
    assert summary["attempts"] - len(result.requests) < 15
    assert all(r.endpoint != "sim-0" for r in result.requests if r.arrival > 0.3)


def test_a_stall_is_noticed_after_the_stall_timeout_and_resumed() -> None:
    res = ResilienceConfig.model_validate({"timeouts": {"stall_s": 0.5}})
    stall = [FaultEvent(t=1.0, fault="stall", endpoint=2)]
    with_resume, without = _run(stall, resilience=res), _run(stall, resume=False, resilience=res)
    on = fault_summary(with_resume)
    assert on["failed"] == 0 and on["resumed"] >= 1
    assert all(r.output_tokens == MAX_TOKENS for r in with_resume.requests)
    stalled = [r for r in with_resume.requests if r.resumes]
    assert min(r.e2e or 0 for r in stalled) > 0.5, "a stall costs at least the stall timeout"
    assert fault_summary(without)["failed"] >= 1


def test_the_gateway_policy_decides_not_the_evaluator() -> None:
    # One attempt, no resumes: a kill fails the broken streams and the refused requests alike.
    res = ResilienceConfig.model_validate({"retries": {"max_attempts": 1}, "resume": {"max_resumes": 0}})
    result = _run([FaultEvent(t=1.0, fault="kill", endpoint=1)], resilience=res)
    failed = {r.failed for r in result.requests if r.failed}
    assert "exhausted" in failed


def test_faults_in_a_trace_and_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.jsonl"
    write_trace(path, _records(60))
    with path.open("a") as fh:
        fh.write(json.dumps({"t": 0.5, "fault": "kill", "endpoint": 1}) + "\n")
    records, faults = read_trace_with_faults(path)
    assert len(records) == 60 and faults == [FaultEvent(0.5, "kill", 1)]
    assert main(["--trace", str(path), "--backends", "3", "--engine-profile", "tiny", "--policy", "round-robin",
                 "--resume", "both", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["resume"] for r in rows] == [True, False]
    assert rows[0]["failed"] == 0 and rows[1]["failed"] >= 1


@pytest.mark.parametrize("bad", ['{"t": 1, "fault": "explode", "endpoint": 0}', '{"t": 1, "fault": "kill"}',
                                 '{"t": 1, "fault": "error", "endpoint": 0}', "[1]", "kill",
                                 '{"t": 1, "fault": "kill", "endpoint": 0, "extra": 1}'])
def test_bad_faults_are_refused_with_a_reason(bad: str) -> None:
    with pytest.raises(ValueError, match="--fault"):
        parse_fault(bad)


def test_a_fault_on_a_missing_endpoint_is_refused() -> None:
    with pytest.raises(ValueError, match="endpoint 7 does not exist"):
        _run([FaultEvent(t=1.0, fault="kill", endpoint=7)])


def test_a_replica_dying_with_a_full_batch_loses_no_stream_to_the_retry_budget() -> None:
    # Big engines, dense arrivals: the kill breaks far more streams than the budget's floor (30 / 10 s).
    engine = get_profile("tiny", max_model_len=4096, max_num_seqs=64, kv_blocks=4096)
    records = _records(400, gap=0.004)
    result = simulate(records, config=lambda reg: policy_config("round-robin", reg), engine=engine, backends=3,
                      faults=[FaultEvent(t=1.0, fault="kill", endpoint=1)], policy_name="round-robin")
    summary = fault_summary(result)
    assert summary["resumed"] + summary["retried"] > 40, summary
    assert summary["failed"] == 0, summary


@pytest.mark.parametrize("status", [429, 503])
def test_a_replica_refusing_everything_does_not_become_a_black_hole(status: int) -> None:
    # A replica that answers at once looks idle, so the load-aware default profile ranks it first for
    # nearly every request; unless its circuit opens, every request pays a retry and the retry budget
    # runs dry, failing requests the healthy replicas could serve.
    records = _records(300, gap=0.05)
    result = simulate(records, config=lambda reg: policy_config("default", reg), engine=TINY, backends=3,
                      faults=[FaultEvent(t=2.0, fault="error", endpoint=0, status=status, duration=10.0)],
                      policy_name="default")
    summary = fault_summary(result)
    assert summary["retried"] >= 5, "the fault cost nothing: the test proved nothing"
    assert summary["failed"] == 0, summary
