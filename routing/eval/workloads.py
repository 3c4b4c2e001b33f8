"""Built-in evaluation workloads, generated as traces (seeded) so they can be written out and replayed.

Text is built from common words that are one token each, so a "2,048-token prompt" really is one.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from routing.eval.generators import ISSUE_WORKLOADS, generate_spec
from routing.eval.trace import TraceRecord

__all__ = ["WORKLOADS", "WorkloadOptions", "generate"]

_WORDS = ["the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "they", "you", "were", "her", "she", "there", "had", "been", "one", "all", "we", "their", "has", "would", "when", "if", "so", "no", "will", "more", "can", "out", "other", "who", "some", "what", "up", "about", "into", "than", "them", "only", "its", "could", "time", "these", "two", "may", "first", "then", "do", "any", "like", "my", "now", "over", "such", "our", "man", "me", "even", "most", "made", "after", "also", "did", "many", "before", "must", "through", "back", "years", "where", "much", "your", "way", "well", "down", "should", "because", "each", "just", "those", "people", "how", "too", "little", "state", "good", "very", "make", "world", "still", "own", "see", "men", "work", "long", "here", "get", "both", "between", "life", "being", "under", "never", "day", "same", "another", "know", "while", "last", "might", "us", "great", "old", "year", "off", "come", "since", "against", "go", "came", "right", "used", "take", "three"]


@dataclass(frozen=True)
class WorkloadOptions:
    seed: int = 0
    requests: int | None = None  # None: the workload's own default
    rate: float | None = None  # requests per second; None: the workload's default
    model: str = "sim-8b"
    kv_tokens_per_backend: int = 491_520  # one h100-8b replica; llm-d's case sizes its working set from it


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(_WORDS, k=n))


def _poisson(rng: random.Random, n: int, rate: float) -> list[float]:
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def _chat(system: str, user: str) -> tuple[dict[str, str], ...]:
    return ({"role": "system", "content": system}, {"role": "user", "content": user})


def shared_prefix(o: WorkloadOptions) -> list[TraceRecord]:
    """SGLang's generated-shared-prefix: 64 groups x 16 prompts, 2,048-token system prompt, 128-token question."""
    rng = random.Random(o.seed)
    groups, per_group = 64, 16
    n = o.requests or groups * per_group
    systems = [_text(rng, 2048) for _ in range(groups)]
    pairs = [(g, _text(rng, 128)) for g in range(groups) for _ in range(per_group)]
    rng.shuffle(pairs)
    # Past 64 x 16, more questions in the same groups (capacity probes need long traces): repeating
    # the first 1,024 prompts verbatim would make the rest free to prefill and inflate capacity.
    pairs += [(rng.randrange(groups), _text(rng, 128)) for _ in range(n - len(pairs))]
    pairs = pairs[:n]
    times = _poisson(rng, n, o.rate or 6.0)
    return [TraceRecord(t, o.model, 256, _chat(systems[g], q)) for t, (g, q) in zip(times, pairs, strict=True)]


def multi_turn(o: WorkloadOptions) -> list[TraceRecord]:
    """Users x rounds of chat; each turn resends the growing history after a think time."""
    rng = random.Random(o.seed)
    rounds = 6
    users = max(1, (o.requests or 600) // rounds)
    system = _text(rng, 512)
    out: list[TraceRecord] = []
    # Users arrive as a Poisson process; within a conversation, turns follow think times.
    starts = _poisson(rng, users, (o.rate or 9.0) / rounds)
    for u, start in enumerate(starts):
        history: list[dict[str, str]] = [{"role": "system", "content": system}]
        t = start
        for _ in range(rounds):
            history.append({"role": "user", "content": _text(rng, rng.randint(64, 256))})
            out.append(TraceRecord(t, o.model, 128, tuple(dict(m) for m in history), session=f"user-{u}"))
            history.append({"role": "assistant", "content": _text(rng, 128)})
            t += 6.0 + rng.expovariate(1 / 4.0)
    out.sort(key=lambda r: r.t)
    return out


def hot_prefix(o: WorkloadOptions) -> list[TraceRecord]:
    """Zipf-skewed prefixes: prefix 0 takes about half the traffic, the rest share a Zipf tail."""
    rng = random.Random(o.seed)
    prefixes = 32
    n = o.requests or 1000
    systems = [_text(rng, 2048) for _ in range(prefixes)]
    tail = [1.0 / (k**1.1) for k in range(1, prefixes)]
    weights = [sum(tail), *tail]  # the hot one equals the whole tail: ~50%
    times = _poisson(rng, n, o.rate or 7.0)
    picks = rng.choices(range(prefixes), weights=weights, k=n)
    return [TraceRecord(t, o.model, 128, _chat(systems[g], _text(rng, 128))) for t, g in zip(times, picks, strict=True)]


def long_doc_qa(o: WorkloadOptions) -> list[TraceRecord]:
    """A few 8-10k-token documents and many short questions about them."""
    rng = random.Random(o.seed)
    docs = [_text(rng, rng.randint(8000, 10000)) for _ in range(4)]
    n = o.requests or 400
    times = _poisson(rng, n, o.rate or 3.0)
    return [
        TraceRecord(t, o.model, 64, _chat("Answer from the document.\n" + rng.choice(docs), _text(rng, 48)))
        for t in times
    ]


def no_sharing(o: WorkloadOptions) -> list[TraceRecord]:
    """Unrelated random prompts: affinity has nothing to find, so balance is all that matters."""
    rng = random.Random(o.seed)
    n = o.requests or 1000
    times = _poisson(rng, n, o.rate or 8.0)
    return [TraceRecord(t, o.model, 128, prompt=_text(rng, rng.randint(512, 1536))) for t in times]


def llmd(o: WorkloadOptions) -> list[TraceRecord]:
    """llm-d's case: 6,000-token prefixes whose working set is ~6x one replica's KV, 1,200-token queries, ramping load."""
    rng = random.Random(o.seed)
    groups = max(2, round(6 * o.kv_tokens_per_backend / 6000))
    n = o.requests or 1200
    systems = [_text(rng, 6000) for _ in range(groups)]
    peak = o.rate or 4.0
    # Arrival rate ramps linearly from 30% to 100% of peak over the trace (a thinned Poisson process).
    times: list[float] = []
    t = 0.0
    horizon = n / (0.65 * peak)
    while len(times) < n:
        t += rng.expovariate(peak)
        if rng.random() <= 0.3 + 0.7 * min(1.0, t / horizon):
            times.append(t)
    return [TraceRecord(t, o.model, 64, _chat(systems[rng.randrange(groups)], _text(rng, 1200))) for t in times]


def _issue(name: str, default_rate: float) -> Callable[[WorkloadOptions], list[TraceRecord]]:
    def make(o: WorkloadOptions) -> list[TraceRecord]:
        return generate_spec(ISSUE_WORKLOADS[name], o.rate or default_rate, o.seed, requests=o.requests)
    make.__doc__ = f"The issue's '{name}' trace, rebuilt as a generator (routing/eval/generators.py)."
    return make


WORKLOADS: dict[str, Callable[[WorkloadOptions], list[TraceRecord]]] = {
    "shared-prefix": shared_prefix,
    "multi-turn": multi_turn,
    "hot-prefix": hot_prefix,
    "long-doc-qa": long_doc_qa,
    "no-sharing": no_sharing,
    "llm-d": llmd,
    # Traces the default was never tuned on (issue 14), as generators; also structures of the sweep.
    "agent-loop": _issue("agent-loop", 9.0),
    "tenant-doc-qa": _issue("tenant-doc-qa", 20.0),
}


def generate(name: str, options: WorkloadOptions | None = None) -> list[TraceRecord]:
    try:
        fn = WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload '{name}'; choose from {', '.join(WORKLOADS)}") from None
    return fn(options or WorkloadOptions())
