"""The sweep runner and report: a tiny end-to-end run, resuming from its cache, the slack rules, the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from routing.eval.cli import main as eval_main
from routing.eval.sweep import (
    CapacityMethod,
    PolicyRef,
    Store,
    SweepOptions,
    parse_seeds,
    policy_refs,
    run_sweep,
)
from routing.eval.sweep_report import build_report, within
from routing.eval.sweep_space import draw_case

TINY_METHOD = CapacityMethod(seeds=1, steps=2, probe_seconds=1.0, probe_max_requests=30)
SEED = 8  # a cheap case: a flat workload of short prompts


def _opts(policies: tuple[PolicyRef, ...], jobs: int = 1) -> SweepOptions:
    return SweepOptions(seeds=(SEED,), policies=policies, loads=(0.5, 0.95), requests=24, method=TINY_METHOD, jobs=jobs)


def test_parse_seeds() -> None:
    assert parse_seeds("1-3,7, 9-10,2") == (1, 2, 3, 7, 9, 10)


@pytest.mark.parametrize(("a", "b", "metric", "ok"), [
    ({"p90": 1.05, "p99": 1.0}, {"p90": 1.0, "p99": 1.0}, None, True),
    ({"p90": 1.06, "p99": 1.0}, {"p90": 1.0, "p99": 1.0}, None, False),
    ({"p90": 1.0, "p99": 1.11}, {"p90": 1.0, "p99": 1.0}, None, False),
    ({"p90": 1.0, "p99": 1.11}, {"p90": 1.0, "p99": 1.0}, "p90", True),
    ({"p90": 2.0, "p99": 1.10}, {"p90": 1.0, "p99": 1.0}, "p99", True),
])
def test_slack_is_5_percent_on_p90_and_10_on_p99(a: dict, b: dict, metric: str | None, ok: bool) -> None:  # type: ignore[type-arg]
    assert within(a, b, metric) is ok


def test_a_sweep_runs_resumes_and_reports(tmp_path: Path) -> None:
    store = Store(tmp_path)
    refs = policy_refs(["default", "round-robin"], None, [])
    cases = run_sweep(_opts(refs), store, progress=lambda _m: None)
    assert [c.key for c in cases] == [draw_case(SEED, requests=24).key]
    runs = store.runs()
    assert len(runs) == 4 and len(store.capacities()) == 1
    assert all(r["p90"] > 0 and r["p99"] >= r["p90"] for r in runs.values())

    # A run cut short leaves a partial line: it is ignored and nothing else is redone.
    with store.runs_path.open("a") as fh:
        fh.write('{"case": "s0')
    messages: list[str] = []
    again = run_sweep(_opts(refs), store, progress=messages.append)
    assert len(again) == 1 and "0 to run" in messages[0]

    # A new policy runs only its own runs; the capacity comes from the cache.
    more = (*refs, PolicyRef("least-request", "least-request"))
    run_sweep(_opts(more), store, progress=lambda _m: None)
    assert len(store.runs()) == 6 and len(store.capacities()) == 1

    digests = {r.label: r.digest() for r in more}
    report = build_report(again, store.runs(), digests, (0.5, 0.95))
    assert len(report.runs) == 2 and all(len(r.by_policy) == 3 for r in report.runs)
    text = report.text()
    assert "within slack of best" in text and "Goals for 'default'" in text


def _row(case: str, load: float, policy: str, cfg: str, p90: float = 1.0) -> dict[str, object]:
    return {"case": case, "seed": 0, "load": load, "policy": policy, "cfg": cfg, "p50": p90 / 2, "p90": p90,
            "p99": 2 * p90, "hit": 0.5, "shed": 0}


def test_the_report_counts_cases_and_says_why_stored_runs_were_left_out(tmp_path: Path) -> None:
    a, b, c, quick = draw_case(SEED), draw_case(SEED + 1), draw_case(SEED + 2), draw_case(SEED, requests=24)
    store = Store(tmp_path)
    store.append(store.runs_path, [
        _row(a.key, 0.5, "default", "d1"), _row(a.key, 0.5, "cache-aware", "c1"),
        _row(a.key, 0.95, "default", "d1"), _row(a.key, 0.95, "cache-aware", "c1"),
        _row(b.key, 0.5, "default", "d1"),  # b: one run of four
        _row(b.key, 0.7, "default", "d1"),  # a load not asked for
        _row(b.key, 0.95, "default", "d0"),  # the default before a change
        _row(quick.key, 0.5, "default", "d1"),  # the --quick variant of case a
        _row(c.key, 0.5, "default", "d1"), _row(c.key, 0.5, "cache-aware", "c1"),
        _row(c.key, 0.95, "default", "d1", p90=1.2), _row(c.key, 0.95, "cache-aware", "c1"),  # 20 % worse
    ])
    digests = {"default": "d1", "cache-aware": "c1"}
    report = build_report([a, b, c], store.runs(), digests, (0.5, 0.95), requested=100)
    text = report.text()
    assert report.cases == 3 and len(report.runs) == 5
    assert text.startswith("3 of 100 cases (2 with every policy at every load), 5 runs (case x load)"), text
    assert "runs of 1 other cases" in text
    assert "runs of 'default' under another config (d0; now d1)" in text
    assert "1 runs at other loads than 0.5, 0.95" in text
    # a: the default equals cache-aware at both loads; c: 20 % worse at one; b: nothing to compare with.
    assert "cases within slack of cache-aware at every load run: 50.0 % (1/2)" in text
    # The cache of a --quick sweep read as the full split: nothing matches, and the report says why.
    empty = build_report([a, b], {k: v for k, v in store.runs().items() if k[0] == quick.key}, digests,
                         (0.5, 0.95)).text()
    assert empty.startswith("0 of 2 cases") and "other cases (another --seeds split, or --quick" in empty


def test_a_changed_profile_is_a_new_policy(tmp_path: Path) -> None:
    cfg = tmp_path / "r.yaml"
    cfg.write_text("routing:\n  profiles:\n    - {name: rr, picker: round-robin}\n    - {name: rnd, picker: random}\n")
    a, b = policy_refs([], str(cfg), ["rr", "rnd"])
    assert a.digest() != b.digest()
    assert PolicyRef("default", "default").digest() == PolicyRef("default", "default").digest()


def test_cli_quick_runs_in_parallel_then_reports_from_its_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep"
    args = ["--sweep", "--quick", "--seeds", str(SEED), "--policy", "default", "--policy", "cache-aware",
            "--loads", "0.95", "--out", str(out)]
    assert eval_main([*args, "--jobs", "2"]) == 0
    first = capsys.readouterr().out
    assert "1 to run" in first and "Goals for 'default'" in first
    assert (out / "sweep.png").stat().st_size > 10_000
    table = tmp_path / "t.json"
    assert eval_main([*args, "--report-only", "--json", str(table)]) == 0
    assert "1 of 1 cases (1 with every policy at every load), 1 runs" in capsys.readouterr().out
    data = json.loads(table.read_text())
    assert set(data["policies"]) == {"default", "cache-aware"} and len(data["runs"]) == 1
    assert eval_main(["--sweep", "--policy", "nope"]) == 2
    assert eval_main(["--sweep", "--describe"]) == 0
    assert "held-out seeds 101-200" in capsys.readouterr().out


def test_a_changed_plugin_or_evaluator_is_a_new_policy_and_version_one_keeps_old_keys() -> None:
    import dataclasses
    import hashlib

    from routing.config import RoutingConfig
    from routing.eval.oracle import oracle_registry
    from routing.plugins.registry import Registry

    ref = PolicyRef("default", "default")
    base = oracle_registry(None)  # type: ignore[arg-type]
    # Runs cached before versions were keyed hold the hash of the config alone: still the key while every
    # plugin a policy runs is at version 1 (round-robin), not once one is past it (the default's, version 2).
    rr = PolicyRef("round-robin", "round-robin")
    blob = json.dumps(rr.config(base).model_dump(mode="json"), sort_keys=True)
    assert rr.digest() == hashlib.blake2b(blob.encode(), digest_size=4).hexdigest()
    blob = json.dumps(RoutingConfig().model_dump(mode="json"), sort_keys=True)
    assert ref.digest() != hashlib.blake2b(blob.encode(), digest_size=4).hexdigest()

    def bumped(type_name: str) -> Registry:
        return Registry(dataclasses.replace(f, version=f.version + 1) if f.type_name == type_name else f for f in base)

    assert ref.digest(bumped("prefill-cost-scorer")) != ref.digest()  # a plugin the default profile runs
    assert ref.digest(bumped("round-robin")) == ref.digest()  # one it does not
    assert PolicyRef("round-robin", "round-robin").digest(bumped("round-robin")) != \
        PolicyRef("round-robin", "round-robin").digest()
    assert ref.digest(evaluator_version=2) != ref.digest()
