"""The sweep's report: how often each policy is within slack of the best and of cache-aware, the issue's
goals, the worst cases with their parameters, and a PNG of the default's ratios per load level.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routing.eval.sweep_space import Case

__all__ = ["P90_SLACK", "P99_SLACK", "Report", "build_report", "plot_ratios"]

P90_SLACK = 1.05
P99_SLACK = 1.10
BASELINES = ("round-robin", "least-request", "cache-aware")
CALIBRATED = "cache-aware-ll"


@dataclass
class Run:
    case: Case
    load: float
    by_policy: dict[str, dict[str, Any]]  # label -> stored summary


def within(a: Mapping[str, Any], b: Mapping[str, Any], metric: str | None = None) -> bool:
    """``a`` is no worse than ``b``: p90 within 5 % and p99 within 10 % (or just ``metric``'s)."""
    ok90 = bool(a["p90"] <= P90_SLACK * b["p90"])
    ok99 = bool(a["p99"] <= P99_SLACK * b["p99"])
    return ok90 if metric == "p90" else ok99 if metric == "p99" else ok90 and ok99


def _best(run: Run, metric: str) -> dict[str, Any]:
    return min(run.by_policy.values(), key=lambda s: s[metric])


def _pct(k: int, n: int) -> str:
    return f"{100 * k / n:.1f} % ({k}/{n})" if n else "- (0/0)"


@dataclass
class Report:
    runs: list[Run]
    policies: list[str]
    target: str
    requested: int = 0  # cases asked for (the split), whether or not the cache has runs for them
    unmatched: list[str] = field(default_factory=list)  # why stored runs were left out, one line each

    @property
    def cases(self) -> int:
        """Cases with at least one run in the report."""
        return len({r.case.key for r in self.runs})

    def text(self, worst: int = 10) -> str:
        out: list[str] = []
        runs, target = self.runs, self.target
        loads = sorted({r.load for r in runs})
        complete = sum(1 for key in {r.case.key for r in runs}
                       if sum(len(r.by_policy) for r in runs if r.case.key == key) == len(loads) * len(self.policies))
        out.append(f"{self.cases} of {self.requested} cases ({complete} with every policy at every load), "
                   f"{len(runs)} runs (case x load), policies: {', '.join(self.policies)}")
        out += [f"note: {line}" for line in self.unmatched]
        out.append(f"slack: p90 within {P90_SLACK - 1:.0%}, p99 within {P99_SLACK - 1:.0%}")
        out.append("")
        out.append("| policy | within slack of best: p90 | p99 | both | within slack of cache-aware (both) | "
                   + " | ".join(f"vs cache-aware at {load:.0%}" for load in loads) + " |")
        out.append("|---|---|---|---|---|" + "---|" * len(loads))
        has_ca = any("cache-aware" in r.by_policy for r in runs)
        for p in self.policies:
            mine = [r for r in runs if p in r.by_policy]
            n = len(mine)
            b90 = sum(within(r.by_policy[p], _best(r, "p90"), "p90") for r in mine)
            b99 = sum(within(r.by_policy[p], _best(r, "p99"), "p99") for r in mine)
            both = sum(within(r.by_policy[p], _best(r, "p90"), "p90") and within(r.by_policy[p], _best(r, "p99"), "p99")
                       for r in mine)
            ca = [r for r in mine if "cache-aware" in r.by_policy]
            ca_ok = sum(within(r.by_policy[p], r.by_policy["cache-aware"]) for r in ca)
            per_load = []
            for load in loads:
                sub = [r for r in ca if r.load == load]
                per_load.append(_pct(sum(within(r.by_policy[p], r.by_policy["cache-aware"]) for r in sub), len(sub))
                                if has_ca else "-")
            out.append(f"| {p} | {_pct(b90, n)} | {_pct(b99, n)} | {_pct(both, n)} | "
                       f"{_pct(ca_ok, len(ca)) if has_ca else '-'} | " + " | ".join(per_load) + " |")
        out.append("")
        if target in self.policies:
            out += self._goals()
            out.append("")
            out += self._worst(worst)
        return "\n".join(out)

    def _goals(self) -> list[str]:
        t = self.target
        runs = [r for r in self.runs if t in r.by_policy]
        out = [f"Goals for '{t}':"]
        ca = [r for r in runs if "cache-aware" in r.by_policy]
        ok = sum(within(r.by_policy[t], r.by_policy["cache-aware"]) for r in ca)
        out.append(f"- within slack of cache-aware on p90 and p99 (goal >= 95 %): {_pct(ok, len(ca))}")
        per_case: dict[str, bool] = {}
        for r in ca:
            per_case[r.case.key] = per_case.get(r.case.key, True) and within(r.by_policy[t], r.by_policy["cache-aware"])
        out.append(f"  cases within slack of cache-aware at every load run: {_pct(sum(per_case.values()), len(per_case))}")
        # The same goal against cache-aware as vllm-router's binary behaves (a low match to the least-loaded
        # worker, not the smallest tree; docs/benchmarks.md, head-to-head calibration), when it ran.
        ll = [r for r in runs if CALIBRATED in r.by_policy]
        if ll:
            ok = sum(within(r.by_policy[t], r.by_policy[CALIBRATED]) for r in ll)
            out.append(f"  against {CALIBRATED} (low_match: least-load, as vllm-router's binary): {_pct(ok, len(ll))}")
        ns = [r for r in runs if r.case.workload.structure == "none" and "least-request" in r.by_policy]
        ok = sum(within(r.by_policy[t], r.by_policy["least-request"]) for r in ns)
        out.append(f"- no-sharing cases, within slack of least-request (goal: all): {_pct(ok, len(ns))}")
        big = [r for r in runs if r.case.ws_per_replica() > 1 and r.load >= 0.7 and "round-robin" in r.by_policy]
        ratios = sorted(r.by_policy["round-robin"]["p90"] / max(1e-9, r.by_policy[t]["p90"]) for r in big)
        ok = sum(x >= 5 for x in ratios)
        med = ratios[len(ratios) // 2] if ratios else math.nan
        out.append(f"- working set > one replica's KV and load >= 70 %: >= 5x round-robin p90 in {_pct(ok, len(big))}"
                   f" (median {med:.1f}x, lowest {ratios[0] if ratios else math.nan:.2f}x)")
        mixed = [r for r in runs if r.case.fleet.mixed and all(b in r.by_policy for b in BASELINES)]
        beats = sum(r.by_policy[t]["p90"] < min(r.by_policy[b]["p90"] for b in BASELINES) for r in mixed)
        near = sum(r.by_policy[t]["p90"] <= P90_SLACK * min(r.by_policy[b]["p90"] for b in BASELINES) for r in mixed)
        out.append(f"- mixed fleets, p90 below every baseline's: {_pct(beats, len(mixed))}; within 5 %: {_pct(near, len(mixed))}")
        return out

    def _worst(self, k: int) -> list[str]:
        t = self.target
        out = []
        for ref in ("cache-aware", "best"):
            for metric in ("p90", "p99"):
                rows = []
                for r in self.runs:
                    if t not in r.by_policy or (ref != "best" and ref not in r.by_policy):
                        continue
                    other = _best(r, metric) if ref == "best" else r.by_policy[ref]
                    name = next(p for p, s in r.by_policy.items() if s is other) if ref == "best" else ref
                    rows.append((r.by_policy[t][metric] / max(1e-9, other[metric]), r, name))
                rows.sort(key=lambda x: -x[0])
                out.append(f"Worst {t}/{ref} on {metric}:")
                for ratio, r, name in rows[:k]:
                    out.append(f"- {ratio:.2f}x ({r.by_policy[t][metric]:.3f} vs {name} {r.by_policy[name][metric]:.3f} s) "
                               f"{r.case.key} at {r.load:.0%}: {r.case.summary()}")
                out.append("")
        return out

    def ratios(self, ref: str, metric: str) -> dict[float, list[float]]:
        """target/ref (``ref`` a policy or ``"best"``) per load level."""
        out: dict[float, list[float]] = {}
        for r in self.runs:
            if self.target not in r.by_policy or (ref != "best" and ref not in r.by_policy):
                continue
            other = _best(r, metric) if ref == "best" else r.by_policy[ref]
            out.setdefault(r.load, []).append(r.by_policy[self.target][metric] / max(1e-9, other[metric]))
        return out


def build_report(cases: Sequence[Case], runs: Mapping[tuple[str, float, str, str], dict[str, Any]],
                 digests: Mapping[str, str], loads: Sequence[float], target: str = "default",
                 requested: int | None = None) -> Report:
    """Join the cases with their stored runs for exactly these policy configs (label -> digest).

    ``requested`` is the split's size when ``cases`` holds only those that ran (a budget stopped it).

    Stored runs left out are counted by reason, so a report of "0 cases" says whether the cache holds
    another split (or the --quick cases), an older config of a policy, or other loads.
    """
    out: list[Run] = []
    for case in cases:
        for load in loads:
            by_policy = {label: runs[(case.key, load, label, cfg)] for label, cfg in digests.items()
                         if (case.key, load, label, cfg) in runs}
            if by_policy:
                out.append(Run(case, load, by_policy))
    keys = {c.key for c in cases}
    other_cases: set[str] = set()
    stale: dict[str, set[str]] = {}
    other_loads = 0
    for key, load, label, cfg in runs:
        if key not in keys:
            other_cases.add(key)
        elif label in digests and cfg != digests[label]:
            stale.setdefault(label, set()).add(cfg)
        elif label in digests and load not in loads:
            other_loads += 1
    notes = []
    if other_cases:
        notes.append(f"the cache also holds runs of {len(other_cases)} other cases (another --seeds split, or "
                     "--quick's smaller cases), not reported")
    for label, cfgs in sorted(stale.items()):
        notes.append(f"runs of '{label}' under another config ({', '.join(sorted(cfgs))}; now {digests[label]}) "
                     "are not reported: that policy changed since they ran")
    if other_loads:
        notes.append(f"{other_loads} runs at other loads than {', '.join(f'{x:g}' for x in loads)} are not reported")
    return Report(out, list(digests), target, requested=len(cases) if requested is None else requested,
                  unmatched=notes)


def plot_ratios(report: Report, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharey="row")
    for row, metric in enumerate(("p90", "p99")):
        for col, ref in enumerate(("cache-aware", "best")):
            ax = axes[row][col]
            data = report.ratios(ref, metric)
            loads = sorted(data)
            if loads:
                ax.boxplot([data[load] for load in loads], positions=range(len(loads)), widths=0.5, whis=(5, 95),
                           showfliers=False)
                for i, load in enumerate(loads):
                    xs = [i + 0.18 * math.sin(k * 2.39) for k in range(len(data[load]))]
                    ax.scatter(xs, data[load], s=6, alpha=0.4)
                ax.set_xticks(range(len(loads)), [f"{load:.0%}" for load in loads])
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.axhline(P90_SLACK if metric == "p90" else P99_SLACK, color="red", lw=0.8, ls="--")
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_yticks([0.25, 0.5, 1, 2, 4])
            label = "per-case best" if ref == "best" else ref
            ax.set_title(f"TTFT {metric}: {report.target} / {label}")
            ax.set_xlabel("load (fraction of the case's capacity)")
    n = report.cases
    fig.suptitle(f"Robustness sweep, {n} cases (box: quartiles, whiskers 5-95 %; dashed: slack)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
