"""Evaluator unit tests on the tiny engine profile: determinism, trace round trip, metrics, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from routing.eval.cli import main
from routing.eval.cluster import simulate
from routing.eval.metrics import percentile, summarize
from routing.eval.policies import POLICIES, policy_config
from routing.eval.trace import TraceRecord, read_trace, write_trace
from routing.eval.workloads import WORKLOADS, WorkloadOptions, generate
from simulator.profiles import get_profile

TINY = get_profile("tiny", max_model_len=4096)


def _shared(n: int = 40) -> list[TraceRecord]:
    system = "shared system prompt " * 60
    return [
        TraceRecord(t=i * 0.02, model="m", max_tokens=8,
                    messages=({"role": "system", "content": system + str(i % 2)}, {"role": "user", "content": f"q{i}"}))
        for i in range(n)
    ]


def _run(policy: str, records: list[TraceRecord], seed: int = 0) -> dict[str, object]:
    result = simulate(records, config=lambda reg: policy_config(policy, reg), engine=TINY, backends=3,
                      seed=seed, policy_name=policy)
    return summarize(result)


def test_deterministic_for_a_seed() -> None:
    records = _shared()
    for policy in ("default", "random"):
        a, b = _run(policy, records, seed=3), _run(policy, records, seed=3)
        a.pop("decision_us_p50"), b.pop("decision_us_p50")  # wall-clock, not virtual time
        assert a == b


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_completes_every_request(policy: str) -> None:
    s = _run(policy, _shared())
    assert s["completed"] == 40 and s["shed"] == 0
    assert 0.0 <= s["hit_rate"] <= 1.0  # type: ignore[operator]


def test_affinity_beats_round_robin_on_hit_rate() -> None:
    records = _shared(60)
    assert _run("default", records)["hit_rate"] > _run("round-robin", records)["hit_rate"]  # type: ignore[operator]


def test_oversized_requests_are_shed_not_fatal() -> None:
    records = [TraceRecord(0.0, "m", 8, prompt="word " * 5000)]
    s = _run("default", records)
    assert s["shed"] == 1 and s["completed"] == 0


def test_percentile_nearest_rank() -> None:
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert percentile([1.0], 99) == 1.0


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_workloads_generate_sorted_traces(name: str, tmp_path: Path) -> None:
    records = generate(name, WorkloadOptions(requests=12, kv_tokens_per_backend=12_000))
    assert len(records) == 12
    assert [r.t for r in records] == sorted(r.t for r in records)
    path = tmp_path / "t.jsonl"
    write_trace(path, records)
    again = read_trace(path)
    assert [r.messages or r.prompt for r in again] == [r.messages or r.prompt for r in records]


def test_trace_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"t": 0, "model": "m", "prompt": "x"}\n{"t": 1, "model": "m"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_trace(path)


def test_cli_trace_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.jsonl"
    write_trace(path, _shared(20))
    code = main(["--trace", str(path), "--backends", "2", "--engine-profile", "tiny", "--policy", "default",
                 "--policy", "round-robin", "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in rows] == ["default", "round-robin"]


def test_cli_config_file_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "r.yaml"
    cfg.write_text("routing:\n  profiles:\n    - {name: rr, picker: round-robin}\n")
    trace = tmp_path / "t.jsonl"
    write_trace(trace, _shared(10))
    assert main(["--trace", str(trace), "--engine-profile", "tiny", "--config", str(cfg), "--profile", "rr"]) == 0
    assert "rr" in capsys.readouterr().out
    assert main(["--trace", str(tmp_path / "missing.jsonl"), "--engine-profile", "tiny"]) == 2
    assert main(["--trace", str(trace), "--engine-profile", "tiny", "--policy", "nope"]) == 2
