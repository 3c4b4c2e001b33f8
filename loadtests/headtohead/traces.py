"""The routing part's traces: four of the evaluator's workloads plus agent loops, at rates sized for
4 h100-8b replicas, every request a chat completion (no-sharing's prompts become one user message).
"""
from __future__ import annotations

import dataclasses
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from routing.eval.trace import TraceRecord
from routing.eval.workloads import WORKLOADS, WorkloadOptions, generate

MODEL = "sim-llama"
# Arrivals per engine second for 4 replicas (scaled by backends / 4): loaded, not saturated.
RATES = {"shared-prefix": 16.0, "multi-turn": 16.0, "agent-loop": 12.0, "long-doc-qa": 8.0, "no-sharing": 16.0}
_WORDS = ["the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not", "this", "are", "or", "from", "at", "which", "but", "have"]


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(_WORDS, k=n))


def agent_loop(o: WorkloadOptions) -> list[TraceRecord]:
    """Agents that share one framework prompt (tools, 1,536 tokens) and run 8 steps each: every step
    resends the whole trajectory plus the last tool call (~48 tokens) and its result (128-512 tokens),
    0.5-2 s after the previous step (the tool's latency)."""
    rng = random.Random(o.seed)
    steps = 8
    agents = max(1, (o.requests or 320) // steps)
    framework = "You are an agent. Tools:\n" + _text(rng, 1536)
    out: list[TraceRecord] = []
    t = 0.0
    for a in range(agents):
        t += rng.expovariate((o.rate or 12.0) / steps)
        history = [{"role": "system", "content": framework},
                   {"role": "user", "content": "Task: " + _text(rng, 192)}]
        step_t = t
        for _ in range(steps):
            out.append(TraceRecord(step_t, o.model, 48, tuple(dict(m) for m in history), session=f"agent-{a}"))
            history.append({"role": "assistant", "content": "call tool(" + _text(rng, 48) + ")"})
            history.append({"role": "user", "content": "Tool result: " + _text(rng, rng.randint(128, 512))})
            step_t += rng.uniform(0.5, 2.0)
    out.sort(key=lambda r: r.t)
    return out


def trace(name: str, requests: int, seed: int, backends: int, max_tokens: int) -> list[TraceRecord]:
    rate = RATES[name] * backends / 4
    opts = WorkloadOptions(seed=seed, requests=requests, rate=rate, model=MODEL)
    records = agent_loop(opts) if name == "agent-loop" else generate(name, opts)
    out = []
    for r in records[:requests]:
        if r.messages is None:
            r = dataclasses.replace(r, messages=({"role": "user", "content": r.prompt or ""},), prompt=None)
        out.append(dataclasses.replace(r, max_tokens=max_tokens))
    return out


NAMES = [*RATES]
assert set(NAMES) - {"agent-loop"} <= set(WORKLOADS)
