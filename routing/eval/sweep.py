"""``gravity eval --sweep``: every policy on generated cases at 50-95 % of each case's measured capacity.

Resumable: capacities and per-run summaries are appended to JSON Lines files in the output directory
and never recomputed (a run is keyed by case, load and a hash of the policy's resolved config).
Cases run in parallel processes; the report is ``routing/eval/sweep_report.py``.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from routing.config import RoutingConfig, load_routing_config, resolve
from routing.eval.capacity import measure_capacity
from routing.eval.cluster import simulate
from routing.eval.generators import generate_spec
from routing.eval.metrics import summarize
from routing.eval.oracle import OracleIndex, oracle_registry
from routing.eval.policies import policy_config
from routing.eval.sweep_space import LOADS, Case, draw_case
from routing.eval.trace import PromptEncoder
from routing.plugins.registry import Registry

__all__ = ["CapacityMethod", "PolicyRef", "Store", "SweepOptions", "case_capacity", "run_case", "run_sweep"]

CAPACITY_POLICIES = ("cache-aware", "least-request")  # fixed baselines: tuning the default cannot move them
# Bump when the evaluator (simulator engines, cluster model, metrics) changes what a run measures: every
# cached run is then redone. Like a plugin's ``PluginFactory.version``, version 1 adds nothing to a key.
EVALUATOR_VERSION = 1
RUN_SECONDS = 30.0
RUN_MAX_REQUESTS = 1200


@dataclass(frozen=True)
class CapacityMethod:
    """How a case's capacity is measured (part of its cache key)."""

    policies: tuple[str, ...] = CAPACITY_POLICIES
    seeds: int = 2  # probe traces per rate; growth averaged over them
    steps: int = 6  # geometric bisection steps in [estimate / 8, estimate * 8] (6.7 % resolution)
    probe_seconds: float = 20.0  # probe traces hold at least this much arrival time...
    probe_max_requests: int = 1600  # ...but at most this many requests
    version: int = 2


@dataclass(frozen=True)
class PolicyRef:
    """A policy to run: a named evaluator policy, or a profile of a routing YAML file."""

    label: str
    name: str | None = None  # a key of routing.eval.policies.POLICIES
    config_path: str | None = None
    profile: str | None = None

    def config(self, registry: Registry) -> RoutingConfig:
        if self.config_path is not None:
            cfg = load_routing_config(self.config_path, registry)
            if self.profile is not None:
                cfg = cfg.model_copy(update={"default_profile": self.profile})
            return cfg
        return policy_config(self.name or self.label, registry)

    def digest(self, registry: Registry | None = None, evaluator_version: int = EVALUATOR_VERSION) -> str:
        """Hash of the resolved config, the behaviour versions of the plugins it runs and the evaluator's:
        a changed default profile, plugin or simulator is a new policy, not a cached one.

        Versions still at 1 add nothing, so runs cached before versions were keyed stay valid.
        """
        # The oracle's plugin type exists only in the evaluator's registry; building nothing needs no index.
        registry = registry or oracle_registry(cast(OracleIndex, None))
        cfg = self.config(registry)
        blob = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
        versions = {t: v for t, v in sorted(_plugin_versions(cfg, registry).items()) if v != 1}
        if evaluator_version != 1:
            versions["(evaluator)"] = evaluator_version
        if versions:
            blob += json.dumps(versions, sort_keys=True)
        return hashlib.blake2b(blob.encode(), digest_size=4).hexdigest()


def _plugin_versions(cfg: RoutingConfig, registry: Registry) -> dict[str, int]:
    """Plugin type -> behaviour version, for every plugin some profile of ``cfg`` runs."""
    out: dict[str, int] = {}
    for profile in cfg.profiles:
        for ref in (*profile.filters, *(r.ref for r in profile.plugins), profile.picker):
            found = resolve(cfg, registry, ref)
            if found is not None:
                out[found[0].type_name] = found[0].version
    return out


@dataclass(frozen=True)
class SweepOptions:
    seeds: tuple[int, ...]
    policies: tuple[PolicyRef, ...]
    loads: tuple[float, ...] = LOADS
    requests: int | None = None  # None: the case's own (400)
    method: CapacityMethod = CapacityMethod()
    jobs: int = 1
    budget_s: float | None = None  # stop starting new cases after this long
    nice: int = 0


class Store:
    """The sweep's results on disk: ``capacity.jsonl`` and ``runs.jsonl``, one JSON object a line."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.capacity_path = self.root / "capacity.jsonl"
        self.runs_path = self.root / "runs.jsonl"

    @staticmethod
    def _read(path: Path) -> list[dict[str, Any]]:
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by an interrupted run: that run is simply redone
        return out

    def capacities(self) -> dict[str, dict[str, Any]]:
        return {row["key"]: row for row in self._read(self.capacity_path)}

    def runs(self) -> dict[tuple[str, float, str, str], dict[str, Any]]:
        return {(r["case"], r["load"], r["policy"], r["cfg"]): r for r in self._read(self.runs_path)}

    def append(self, path: Path, rows: Iterable[dict[str, Any]]) -> None:
        # A line cut short by an interrupted run must not swallow the first row written after it.
        torn = False
        if path.exists() and path.stat().st_size > 0:
            with path.open("rb") as fh:
                fh.seek(-1, 2)
                torn = fh.read(1) != b"\n"
        with path.open("a") as fh:
            if torn:
                fh.write("\n")
            for row in rows:
                fh.write(json.dumps(row, separators=(",", ":")) + "\n")


def _capacity_key(case: Case, method: CapacityMethod) -> str:
    blob = json.dumps(dataclasses.asdict(method), sort_keys=True)
    return f"{case.key}-{hashlib.blake2b(blob.encode(), digest_size=3).hexdigest()}"


def _estimate(case: Case) -> float:
    """A rough sustainable rate to centre the bisection on: prefill work alone, net of reuse."""
    records = generate_spec(case.workload, 1.0, case.seed)
    encoder = PromptEncoder()
    prompt = sum(len(encoder.encode(r)[1]) for r in records) / len(records)
    output = sum(r.max_tokens for r in records) / len(records)
    reuse = min(0.95, case.working_set_tokens / max(1.0, prompt * len(records)))
    engines = case.fleet.engines()
    seconds = sum(1.0 / (e.prefill_per_token_s * prompt * (1 - reuse) + e.decode_base_s * output / 32) for e in engines)
    return max(0.05, seconds)


def case_capacity(case: Case, method: CapacityMethod) -> dict[str, Any]:
    """The highest rate any of ``method.policies`` sustains on ``case``'s fleet, with each one's figure.

    The first policy is bisected in [estimate / 8, estimate x 8]; each next one is first probed just
    above the best so far and bisected upwards only if it keeps up there, so a policy that cannot
    raise the maximum costs one probe instead of a full search.
    """
    est = _estimate(case)
    engines = case.fleet.engines()
    workload = case.workload

    def probe(rate: float, seed: int) -> list[Any]:
        n = max(workload.requests, min(method.probe_max_requests, math.ceil(rate * method.probe_seconds)))
        return generate_spec(workload, rate, seed, requests=n)

    out: dict[str, Any] = {"estimate": round(est, 4)}
    seeds = tuple(case.seed * 1000 + k for k in range(1, method.seeds + 1))
    # No sharing: the balancing baseline is the likelier maximum, so it goes first.
    order = sorted(method.policies, key=lambda p: p != "least-request") if workload.structure == "none" \
        else list(method.policies)
    best = 0.0
    step = (64.0 ** (1 / 2 ** method.steps))  # the bisection's resolution over its x64 range
    for name in order:
        config = functools.partial(policy_config, name)
        if best <= 0:
            cap = measure_capacity(probe, config=config, engine=engines, backends=len(engines),
                                   lo=est / 8, hi=est * 8, steps=method.steps, seeds=seeds)
        else:
            first = measure_capacity(probe, config=config, engine=engines, backends=len(engines),
                                     lo=best, hi=best * step * step, steps=1, seeds=seeds)
            cap = first if first.rate <= best else measure_capacity(
                probe, config=config, engine=engines, backends=len(engines), lo=first.rate, hi=best * 8,
                steps=method.steps, seeds=seeds)
            if cap.rate <= best:
                cap = dataclasses.replace(cap, rate=0.0)  # not above the best so far: its own figure unknown
        out[name] = round(cap.rate, 4)
        out[f"{name}_probes"] = [[round(r, 3), ok] for r, ok in cap.probes]
        best = max(best, cap.rate)
    out["rate"] = round(best, 4)
    return out


def _summary(result: Any) -> dict[str, Any]:
    s = summarize(result)
    return {"p50": round(s["ttft_p50"], 4), "p90": round(s["ttft_p90"], 4), "p99": round(s["ttft_p99"], 4),
            "hit": round(s["hit_rate"], 4), "shed": s["shed"]}


def run_case(seed: int, opts: SweepOptions, capacity: dict[str, Any] | None,
             done: set[tuple[float, str, str]]) -> tuple[Case, dict[str, Any], list[dict[str, Any]]]:
    """Capacity (unless given) and every missing (load, policy) run of one case; returns new rows."""
    if opts.nice:
        os.nice(opts.nice)
    case = draw_case(seed, requests=opts.requests)
    started = time.process_time()
    if capacity is None:
        capacity = {"key": _capacity_key(case, opts.method), "case": case.key, **case_capacity(case, opts.method)}
        capacity["cpu_s"] = round(time.process_time() - started, 1)
    rows: list[dict[str, Any]] = []
    engines = case.fleet.engines(seed)
    digests = {p.label: p.digest() for p in opts.policies}
    for load in opts.loads:
        pending = [p for p in opts.policies if (load, p.label, digests[p.label]) not in done]
        if not pending:
            continue
        rate = load * capacity["rate"]
        records = generate_spec(case.workload, rate, seed, requests=run_requests(case, rate, opts.requests))
        for policy in pending:
            t0 = time.process_time()
            config: Callable[[Registry], RoutingConfig] = policy.config
            result = simulate(records, config=config, engine=engines, seed=seed, policy_name=policy.label)
            rows.append({"case": case.key, "seed": seed, "load": load, "policy": policy.label,
                         "cfg": digests[policy.label], **_summary(result),
                         "cpu_s": round(time.process_time() - t0, 2)})
    return case, capacity, rows


def run_requests(case: Case, rate: float, fixed: int | None = None) -> int:
    """Requests in one benchmark run: the case's own (400) or ``RUN_SECONDS`` of arrivals, at most
    ``RUN_MAX_REQUESTS``: 400 requests at 80/s would be a 5 s trace, all cold start."""
    if fixed is not None:
        return fixed
    return max(case.workload.requests, min(RUN_MAX_REQUESTS, math.ceil(rate * RUN_SECONDS)))


def _job(args: tuple[int, SweepOptions, dict[str, Any] | None, set[tuple[float, str, str]]]) -> tuple[
        Case, dict[str, Any], list[dict[str, Any]]]:
    return run_case(*args)


def run_sweep(opts: SweepOptions, store: Store, progress: Callable[[str], None] = print) -> list[Case]:
    """Run every case of ``opts.seeds`` not already in ``store``; returns the cases finished or cached."""
    capacities = store.capacities()
    runs = store.runs()
    digests = {p.label: p.digest() for p in opts.policies}
    started = time.monotonic()
    todo: list[tuple[int, SweepOptions, dict[str, Any] | None, set[tuple[float, str, str]]]] = []
    cases: list[Case] = []
    for seed in opts.seeds:
        case = draw_case(seed, requests=opts.requests)
        cap = capacities.get(_capacity_key(case, opts.method))
        done = {(load, label, cfg) for (key, load, label, cfg) in runs if key == case.key}
        wanted = {(load, p.label, digests[p.label]) for load in opts.loads for p in opts.policies}
        if cap is not None and wanted <= done:
            cases.append(case)
            continue
        todo.append((seed, opts, cap, done))
    progress(f"sweep: {len(opts.seeds)} cases, {len(cases)} already done, {len(todo)} to run "
             f"({len(opts.policies)} policies x {len(opts.loads)} loads, {opts.jobs} jobs)")

    def record(result: tuple[Case, dict[str, Any], list[dict[str, Any]]]) -> None:
        case, cap, rows = result
        if cap["key"] not in capacities:
            capacities[cap["key"]] = cap
            store.append(store.capacity_path, [cap])
        store.append(store.runs_path, rows)
        cases.append(case)
        elapsed = time.monotonic() - started
        progress(f"  {case.key} capacity {cap['rate']:.3g}/s ({len(rows)} runs) "
                 f"[{len(cases)}/{len(opts.seeds)}, {elapsed / 60:.1f} min] {case.summary()}")

    def over_budget() -> bool:
        return opts.budget_s is not None and time.monotonic() - started > opts.budget_s

    if opts.jobs <= 1:
        for job in todo:
            if over_budget():
                progress(f"sweep: time budget reached after {(time.monotonic() - started) / 60:.1f} min; "
                         "run again to continue")
                break
            record(_job(job))
        return cases
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(opts.jobs, mp_context=ctx) as pool:
        queue = list(reversed(todo))
        pending: set[Future[tuple[Case, dict[str, Any], list[dict[str, Any]]]]] = set()
        while True:
            while queue and len(pending) < opts.jobs and not over_budget():
                pending.add(pool.submit(_job, queue.pop()))
            if not pending:
                break
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                record(fut.result())
    if over_budget():
        progress(f"sweep: time budget reached after {(time.monotonic() - started) / 60:.1f} min; "
                 "run again to continue")
    return cases


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"1-100"``, ``"101-200"``, ``"3,7,9-12"``."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.extend(range(int(lo), int(hi) + 1))
        else:
            out.append(int(part))
    return tuple(dict.fromkeys(out))


def policy_refs(names: Sequence[str], config: str | None, profiles: Sequence[str]) -> tuple[PolicyRef, ...]:
    refs = [PolicyRef(label=n, name=n) for n in names]
    if config is not None:
        refs += [PolicyRef(label=p, config_path=config, profile=p) for p in profiles or ["default"]]
    return tuple(refs)
