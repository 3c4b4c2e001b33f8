"""The robustness sweep's case space: one :class:`Case` (workload + fleet) drawn per seed from documented ranges.

Seeds 1-100 are for tuning, 101-200 are held out for reporting (``TUNING_SEEDS``, ``HELD_OUT_SEEDS``).
The ranges are in ``RANGES`` (printed by ``gravity eval --sweep --describe``) and in docs/routing.md.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
from dataclasses import dataclass
from typing import Any

from routing.eval.generators import ArrivalSpec, OutputSpec, WorkloadSpec, generate_spec, reusable_tokens
from simulator.engine import EngineConfig
from simulator.profiles import get_profile

__all__ = ["HELD_OUT_SEEDS", "LOADS", "RANGES", "SPACE_VERSION", "TUNING_SEEDS", "Case", "FleetSpec", "draw_case"]

TUNING_SEEDS = range(1, 101)
HELD_OUT_SEEDS = range(101, 201)
LOADS = (0.5, 0.7, 0.85, 0.95)  # fractions of the case's measured capacity
SPACE_VERSION = 2  # bump when a range changes: it is part of every case key, so old results are not reused
_H100_KV_TOKENS = 30_720 * 16
_MAX_GROUPS = {"flat": 512, "tree": 256}  # raised up to these to reach a high working-set ratio
_MAX_PROMPT = 64_000  # longest request a drawn workload may send (sessions are shortened to fit)

# Human-readable ranges, exactly what draw_case() samples ("log" = log-uniform).
RANGES: dict[str, str] = {
    "structure": "none 10 %, flat 25 %, tree 20 %, agent 25 %, chat 20 %",
    "requests": "per run max(400, 30 s of arrivals), at most 1,200; capacity probes max(400, 20 s), at most 1,600",
    "flat": "groups 2-128 (log); prefix 256-6,000 tokens (log) x up to 1.5 spread; question 16-512 (log)",
    "tree": "systems 1-6 (100-2,000 tokens) -> documents 2-48 (1,000-10,000 tokens, log) -> question 16-200",
    "agent": "agent prompts 1-8 (1,000-6,000 tokens); steps 2-10 .. +0-12; tool results 100-2,000 (log) x up to 3; "
             "think 0.2-3 s (x1-3); histories capped at 64k tokens; hot chat share 0 (40 %) or 0-0.5, over 1-8 hot prompts of 300-3,000 tokens",
    "chat": "system prompts 1-16 (200-3,000 tokens); turns 2-10 .. +0-6; user turn 32-512 (log) x up to 2; "
            "think 2-10 s (x1-2)",
    "none": "prompts 128-4,000 tokens (log) x up to 3",
    "zipf": "0 (20 %) or 0.2-1.5 over groups/documents/agents/system prompts",
    "output": "fixed / uniform 1..2m / exponential (cap 6m) / bimodal (80 % m/4, 20 % 4m); mean m 16-512 (log)",
    "arrivals": "Poisson 50 %; on/off 25 % (bursts 1-5 s, gaps 1-10 s); ramp 25 % (from 0.2-0.6 of the peak)",
    "backends": "4-16 (log)",
    "fleet": "all h100-8b 35 %, all a100-8b 15 %, mixed 50 % (a100 share 25-75 %); one replica with half "
             "the KV in 30 % of cases",
    "kv": "reusable working set / one replica's KV: 0.25 to 3 x backends (log), i.e. from everything fits "
          "on one replica to 3x the whole cluster; KV per replica at least 1.25x the longest request (the half replica too) and at "
          "most an h100-8b's 491,520 tokens; flat groups (up to 512) and tree documents (up to 256) are "
          "raised when the ratio asks for less KV than that floor",
    "loads": "50 / 70 / 85 / 95 % of the case's capacity: the highest rate cache-aware or least-request sustains (backlog growth over 2 probe seeds <= 5 %, bisection to 6.7 %)",
}


@dataclass(frozen=True)
class FleetSpec:
    profiles: tuple[str, ...]  # engine profile per backend
    kv_tokens: tuple[int, ...]  # KV per backend, tokens (multiple of 16)

    def engines(self, seed: int = 0) -> list[EngineConfig]:
        return [get_profile(p, kv_blocks=kv // 16, seed=seed) for p, kv in zip(self.profiles, self.kv_tokens, strict=True)]

    @property
    def mixed(self) -> bool:
        return len(set(self.profiles)) > 1 or len(set(self.kv_tokens)) > 1


@dataclass(frozen=True)
class Case:
    seed: int
    workload: WorkloadSpec
    fleet: FleetSpec
    working_set_tokens: int  # reusable prompt tokens of the benchmark trace (at the reference rate)

    @property
    def key(self) -> str:
        """Stable id: the seed and a hash of everything that defines the case."""
        digest = hashlib.blake2b(json.dumps(self.describe(), sort_keys=True).encode(), digest_size=4).hexdigest()
        return f"s{self.seed:03d}-{digest}"

    @property
    def backends(self) -> int:
        return len(self.fleet.profiles)

    def ws_per_replica(self) -> float:
        """Working set over the smallest replica's KV (> 1: it cannot fit on one replica)."""
        return self.working_set_tokens / max(1, min(self.fleet.kv_tokens))

    def ws_per_cluster(self) -> float:
        return self.working_set_tokens / max(1, sum(self.fleet.kv_tokens))

    def describe(self) -> dict[str, Any]:
        return {"v": SPACE_VERSION, "seed": self.seed, "workload": dataclasses.asdict(self.workload),
                "fleet": dataclasses.asdict(self.fleet), "ws": self.working_set_tokens}

    def summary(self) -> str:
        """One line for reports: what kind of case this is."""
        w, f = self.workload, self.fleet
        a100 = sum(1 for p in f.profiles if p == "a100-8b")
        fleet = f"{self.backends}x" + ("h100" if a100 == 0 else "a100" if a100 == self.backends else f"mixed({a100} a100)")
        if len(set(f.kv_tokens)) > 1:
            fleet += "+halfKV"
        shape = {"none": "no-sharing", "flat": f"flat {w.groups}g {w.prefix_tokens[0]}-{w.prefix_tokens[1]}t",
                 "tree": f"tree {w.systems}s/{w.groups}d {w.prefix_tokens[0]}-{w.prefix_tokens[1]}t",
                 "agent": f"agent {w.groups}a steps {w.steps[0]}-{w.steps[1]} tool {w.tool_tokens[1]}t hot {w.hot_share:.2f}",
                 "chat": f"chat {w.groups}s turns {w.steps[0]}-{w.steps[1]}"}[w.structure]
        return (f"{shape}, zipf {w.zipf:.2f}, out {w.output.kind} {w.output.mean}, {w.arrivals.kind}, {fleet}, "
                f"ws/replica {self.ws_per_replica():.2f} ws/cluster {self.ws_per_cluster():.2f}")


def _log_uniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def _log_int(rng: random.Random, lo: int, hi: int) -> int:
    return max(lo, min(hi, round(_log_uniform(rng, lo, hi + 0.499))))


def _span(rng: random.Random, lo: int, hi: int, spread: float = 1.5) -> tuple[int, int]:
    a = _log_int(rng, lo, hi)
    return a, max(a, round(a * rng.uniform(1.0, spread)))


def _workload(rng: random.Random) -> WorkloadSpec:
    structure = rng.choices(["none", "flat", "tree", "agent", "chat"], weights=[10, 25, 20, 25, 20])[0]
    zipf = 0.0 if rng.random() < 0.2 else rng.uniform(0.2, 1.5)
    output = OutputSpec(rng.choice(["fixed", "uniform", "exp", "bimodal"]), _log_int(rng, 16, 512))
    kind = rng.choices(["poisson", "onoff", "ramp"], weights=[50, 25, 25])[0]
    arrivals = ArrivalSpec(kind, on_s=rng.uniform(1, 5), off_s=rng.uniform(1, 10), ramp_from=rng.uniform(0.2, 0.6))
    base = WorkloadSpec(structure, requests=400, zipf=zipf, output=output, arrivals=arrivals)
    if structure == "none":
        return dataclasses.replace(base, prefix_tokens=_span(rng, 128, 4000, 3.0))
    if structure == "flat":
        return dataclasses.replace(base, groups=_log_int(rng, 2, 128), prefix_tokens=_span(rng, 256, 6000),
                            question_tokens=_span(rng, 16, 512, 2.0))
    if structure == "tree":
        return dataclasses.replace(base, systems=rng.randint(1, 6), system_tokens=_span(rng, 100, 2000),
                            groups=_log_int(rng, 2, 48), prefix_tokens=_span(rng, 1000, 10000),
                            question_tokens=_span(rng, 16, 200, 2.0))
    if structure == "agent":
        lo = rng.randint(2, 10)
        think = rng.uniform(0.2, 3.0)
        return dataclasses.replace(base, groups=rng.randint(1, 8), prefix_tokens=_span(rng, 1000, 6000, 1.3),
                            question_tokens=_span(rng, 32, 300, 2.0), steps=(lo, lo + rng.randint(0, 12)),
                            tool_tokens=_span(rng, 100, 2000, 3.0), think_s=(think, think * rng.uniform(1, 3)),
                            hot_share=0.0 if rng.random() < 0.4 else rng.uniform(0.0, 0.5),
                            hot_prompts=rng.randint(1, 8), hot_tokens=_span(rng, 300, 3000, 2.0))
    lo = rng.randint(2, 10)
    think = rng.uniform(2.0, 10.0)
    return dataclasses.replace(base, groups=_log_int(rng, 1, 16), prefix_tokens=_span(rng, 200, 3000),
                        question_tokens=_span(rng, 32, 512, 2.0), steps=(lo, lo + rng.randint(0, 6)),
                        think_s=(think, think * rng.uniform(1, 2)))


def draw_case(seed: int, *, requests: int | None = None) -> Case:
    """The case of ``seed``: same seed, same case, on any machine (``random.Random`` is seeded by string)."""
    rng = random.Random(f"gravity-sweep-{SPACE_VERSION}-{seed}")
    workload = _workload(rng)
    if requests is not None:
        workload = dataclasses.replace(workload, requests=requests)
    while workload.longest_prompt() > _MAX_PROMPT and workload.steps[1] > workload.steps[0]:
        workload = dataclasses.replace(workload, steps=(workload.steps[0], workload.steps[1] - 1))
    backends = _log_int(rng, 4, 16)
    mix = rng.choices(["h100", "a100", "mixed"], weights=[35, 15, 50])[0]
    if mix == "mixed":
        slow = max(1, min(backends - 1, round(backends * rng.uniform(0.25, 0.75))))
        profiles = ["a100-8b"] * slow + ["h100-8b"] * (backends - slow)
        rng.shuffle(profiles)
    else:
        profiles = [f"{mix}-8b"] * backends
    half_kv = rng.random() < 0.3
    ratio = _log_uniform(rng, 0.25, 3.0 * backends)  # working set / one replica's KV
    longest = workload.longest_prompt() + workload.output_cap()
    floor = math.ceil(1.25 * longest * (2 if half_kv else 1))  # even the half replica holds the longest
    # The working set is measured on the benchmark trace itself (at a nominal rate: the trace's
    # length in requests is fixed, so the rate moves sessions' overlap, not which prefixes occur).
    working_set = reusable_tokens(generate_spec(workload, 1.0, seed))
    cap = _MAX_GROUPS.get(workload.structure)
    if cap and working_set and working_set / ratio < floor and workload.groups < cap:
        # A replica must hold the longest request; reach a high ratio with more groups, not less KV.
        groups = min(cap, math.ceil(workload.groups * floor * ratio / working_set))
        workload = dataclasses.replace(workload, groups=groups)
        working_set = reusable_tokens(generate_spec(workload, 1.0, seed))
    kv = max(floor, min(_H100_KV_TOKENS, round(working_set / ratio))) if working_set else _H100_KV_TOKENS // 4
    kv -= kv % 16
    kv_tokens = [kv] * backends
    if half_kv:
        kv_tokens[rng.randrange(backends)] = (kv // 2) - (kv // 2) % 16
    return Case(seed, workload, FleetSpec(tuple(profiles), tuple(kv_tokens)), working_set)
