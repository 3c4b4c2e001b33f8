"""Parametrised workload generators: sharing structure, popularity skew, arrival process and output lengths.

A :class:`WorkloadSpec` describes a workload; :func:`generate_spec` draws its trace at a given rate. The
robustness sweep (``routing/eval/sweep_space.py``) draws the specs; ``ISSUE_WORKLOADS`` holds two fixed ones.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from routing.eval.trace import TraceRecord

__all__ = [
    "ISSUE_WORKLOADS",
    "STRUCTURES",
    "ArrivalSpec",
    "OutputSpec",
    "WorkloadSpec",
    "arrival_times",
    "generate_spec",
    "output_lengths",
    "zipf_weights",
]

# One o200k token each (after a space), so an n-word text is about n tokens.
_WORDS = ["the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "they", "you", "were", "her", "she", "there", "had", "been", "one", "all", "we", "their", "has", "would", "when", "if", "so", "no", "will", "more", "can", "out", "other", "who", "some", "what", "up", "about", "into", "than", "them", "only", "its", "could", "time", "these", "two", "may", "first", "then", "do", "any", "like", "my", "now", "over", "such", "our", "man", "me", "even", "most", "made", "after", "also", "did", "many", "before", "must", "through", "back", "years", "where", "much", "your", "way", "well", "down", "should", "because", "each", "just", "those", "people", "how", "too", "little", "state", "good", "very", "make", "world", "still", "own", "see", "men", "work", "long", "here", "get", "both", "between", "life", "being", "under", "never", "day", "same", "another", "know", "while", "last", "might", "us", "great", "old", "year", "off", "come", "since", "against", "go", "came", "right", "used", "take", "three"]

STRUCTURES = ("none", "flat", "tree", "agent", "chat")
_CALL_TOKENS = 61  # an agent's tool call in the history: "call" + 20-60 words


def _template(messages: int) -> int:
    # The simulator's Llama-3 template is plain text to its tokenizer: ~22 tokens a message, ~22 more.
    return 24 + 24 * messages


@dataclass(frozen=True)
class ArrivalSpec:
    """How requests (or sessions) arrive. ``rate`` passed to :func:`generate_spec` is the mean rate for
    ``poisson`` and ``onoff`` and the peak for ``ramp``."""

    kind: str = "poisson"  # poisson | onoff | ramp
    on_s: float = 2.0  # onoff: length of a burst; arrivals only during bursts, at rate * (on + off) / on
    off_s: float = 2.0  # onoff: quiet gap between bursts
    ramp_from: float = 0.3  # ramp: starting fraction of the peak, rising linearly to 1 over the trace


@dataclass(frozen=True)
class OutputSpec:
    kind: str = "fixed"  # fixed | uniform (1..2 mean) | exp (exponential, capped at 6 mean) | bimodal
    mean: int = 128


@dataclass(frozen=True)
class WorkloadSpec:
    """One workload. Token ranges are (low, high), drawn uniformly per item.

    - ``none``: unrelated prompts of ``prefix_tokens``.
    - ``flat``: ``groups`` shared prefixes (``prefix_tokens``) + a question; group popularity Zipf(``zipf``).
    - ``tree``: ``systems`` system prompts -> ``groups`` documents spread over them -> a question;
      document popularity Zipf(``zipf``). Multi-tenant document QA is a tree with one system per tenant.
    - ``agent``: ``groups`` agent prompts (instructions + tool schemas, ``prefix_tokens``); each session
      sends a task, then ``steps`` requests whose history grows by a tool call and a tool result
      (``tool_tokens``) each, ``think_s`` apart; ``hot_share`` of the requests are one-shot chat over
      ``hot_prompts`` hot system prompts.
    - ``chat``: ``groups`` system prompts; sessions of ``steps`` turns (user ``question_tokens``,
      assistant ``output.mean``), ``think_s`` apart.
    """

    structure: str
    requests: int = 400
    groups: int = 16
    prefix_tokens: tuple[int, int] = (1024, 2048)
    systems: int = 1
    system_tokens: tuple[int, int] = (256, 1024)
    question_tokens: tuple[int, int] = (32, 256)
    zipf: float = 0.0
    steps: tuple[int, int] = (4, 10)
    tool_tokens: tuple[int, int] = (200, 1500)
    think_s: tuple[float, float] = (1.0, 4.0)
    hot_share: float = 0.0
    hot_prompts: int = 4
    hot_tokens: tuple[int, int] = (512, 2048)
    output: OutputSpec = field(default_factory=OutputSpec)
    arrivals: ArrivalSpec = field(default_factory=ArrivalSpec)
    model: str = "sim-8b"

    def __post_init__(self) -> None:
        if self.structure not in STRUCTURES:
            raise ValueError(f"unknown structure '{self.structure}'; choose from {', '.join(STRUCTURES)}")

    def longest_prompt(self) -> int:
        """Upper bound on any prompt's tokens (chat template included), to size engines."""
        q = self.question_tokens[1]
        if self.structure == "none":
            return self.prefix_tokens[1] + 1
        if self.structure == "tree":
            return self.system_tokens[1] + self.prefix_tokens[1] + q + _template(3)
        if self.structure == "agent":
            steps = self.steps[1]
            agent = self.prefix_tokens[1] + q + (steps - 1) * (self.tool_tokens[1] + _CALL_TOKENS) + _template(2 * steps)
            return max(agent, self.hot_tokens[1] + q + _template(2))
        if self.structure == "chat":
            steps = self.steps[1]
            return self.prefix_tokens[1] + steps * q + (steps - 1) * self.output_cap() + _template(2 * steps)
        return self.prefix_tokens[1] + q + _template(2)

    def output_cap(self) -> int:
        o = self.output
        return {"fixed": o.mean, "uniform": 2 * o.mean, "exp": 6 * o.mean, "bimodal": 4 * o.mean}[o.kind]


def zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (k ** s) for k in range(1, n + 1)]


def arrival_times(rng: random.Random, n: int, rate: float, spec: ArrivalSpec) -> list[float]:
    """``n`` increasing arrival times of the process ``spec`` at ``rate`` (see :class:`ArrivalSpec`)."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    out: list[float] = []
    t = 0.0
    if spec.kind == "poisson":
        for _ in range(n):
            t += rng.expovariate(rate)
            out.append(t)
    elif spec.kind == "onoff":
        period = spec.on_s + spec.off_s
        burst_rate = rate * period / spec.on_s
        while len(out) < n:
            t += rng.expovariate(burst_rate)
            # Time spent in bursts maps to wall time with the quiet gaps inserted.
            bursts, into = divmod(t, spec.on_s)
            out.append(bursts * period + into)
    elif spec.kind == "ramp":
        # A thinned Poisson process at the peak rate, accepting with the ramp's fraction.
        horizon = n / (rate * (1 + spec.ramp_from) / 2)
        while len(out) < n:
            t += rng.expovariate(rate)
            if rng.random() <= spec.ramp_from + (1 - spec.ramp_from) * min(1.0, t / horizon):
                out.append(t)
    else:
        raise ValueError(f"unknown arrival kind '{spec.kind}'")
    return out


def output_lengths(rng: random.Random, n: int, spec: OutputSpec) -> list[int]:
    m = max(1, spec.mean)
    if spec.kind == "fixed":
        return [m] * n
    if spec.kind == "uniform":
        return [rng.randint(1, 2 * m) for _ in range(n)]
    if spec.kind == "exp":
        return [max(1, min(6 * m, round(rng.expovariate(1 / m)))) for _ in range(n)]
    if spec.kind == "bimodal":
        # Most answers short, a fifth long (4x the mean), with the same mean overall.
        short = max(1, round(m * 0.25))
        return [4 * m if rng.random() < 0.2 else short for _ in range(n)]
    raise ValueError(f"unknown output kind '{spec.kind}'")


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(_WORDS, k=max(1, n)))


def _draw(rng: random.Random, span: tuple[int, int]) -> int:
    return rng.randint(span[0], max(span[0], span[1]))


def generate_spec(spec: WorkloadSpec, rate: float, seed: int, requests: int | None = None) -> list[TraceRecord]:
    """The trace of ``spec`` at ``rate`` requests/s (see :class:`ArrivalSpec`), sorted by time.

    The shared texts (prefixes, documents, agent prompts) depend only on ``seed``, not on the rate, so
    probes at different rates of one seed share their prefixes, as the capacity search needs.
    """
    n = requests or spec.requests
    text_rng = random.Random(f"text-{seed}")
    rng = random.Random(f"trace-{seed}-{rate!r}-{n}")
    fn = {"none": _none, "flat": _flat, "tree": _tree, "agent": _agent, "chat": _chat}[spec.structure]
    records = fn(spec, rate, n, text_rng, rng)
    records.sort(key=lambda r: r.t)
    return records[:n]


def _none(spec: WorkloadSpec, rate: float, n: int, _text_rng: random.Random, rng: random.Random) -> list[TraceRecord]:
    times = arrival_times(rng, n, rate, spec.arrivals)
    outs = output_lengths(rng, n, spec.output)
    return [TraceRecord(t, spec.model, o, prompt=_text(rng, _draw(rng, spec.prefix_tokens)))
            for t, o in zip(times, outs, strict=True)]


def _flat(spec: WorkloadSpec, rate: float, n: int, text_rng: random.Random, rng: random.Random) -> list[TraceRecord]:
    prefixes = [_text(text_rng, _draw(text_rng, spec.prefix_tokens)) for _ in range(spec.groups)]
    order = list(range(spec.groups))
    text_rng.shuffle(order)  # which group is popular is not which was drawn first
    picks = rng.choices(order, weights=zipf_weights(spec.groups, spec.zipf), k=n)
    times = arrival_times(rng, n, rate, spec.arrivals)
    outs = output_lengths(rng, n, spec.output)
    return [
        TraceRecord(t, spec.model, o, ({"role": "system", "content": prefixes[g]},
                                       {"role": "user", "content": _text(rng, _draw(rng, spec.question_tokens))}))
        for t, g, o in zip(times, picks, outs, strict=True)
    ]


def _tree(spec: WorkloadSpec, rate: float, n: int, text_rng: random.Random, rng: random.Random) -> list[TraceRecord]:
    systems = [_text(text_rng, _draw(text_rng, spec.system_tokens)) for _ in range(max(1, spec.systems))]
    docs = [(d % len(systems), _text(text_rng, _draw(text_rng, spec.prefix_tokens))) for d in range(spec.groups)]
    order = list(range(spec.groups))
    text_rng.shuffle(order)
    picks = rng.choices(order, weights=zipf_weights(spec.groups, spec.zipf), k=n)
    times = arrival_times(rng, n, rate, spec.arrivals)
    outs = output_lengths(rng, n, spec.output)
    out = []
    for t, d, o in zip(times, picks, outs, strict=True):
        s, doc = docs[d]
        # Three messages so the encoder memoises the system prompt and the document separately.
        messages = ({"role": "system", "content": systems[s]}, {"role": "user", "content": doc},
                    {"role": "user", "content": _text(rng, _draw(rng, spec.question_tokens))})
        out.append(TraceRecord(t, spec.model, o, messages))
    return out


_Session = Callable[[random.Random, str, float, int], list[TraceRecord]]


def _sessions(spec: WorkloadSpec, rate: float, n: int, rng: random.Random,
              session: _Session, prompts: int) -> list[TraceRecord]:
    """Sessions arriving by ``spec.arrivals``, each a run of requests ``think_s`` apart, until ``n`` fit.

    Sessions start from one session lifetime *before* t = 0 and only requests at t >= 0 are kept, so
    the trace runs at the steady rate from its start (traffic already in flight when it begins, its
    caches cold) instead of ramping up over a session's lifetime: capacity probes of a few hundred
    requests would otherwise never leave the ramp. Sessions are drawn past the point where ``n``
    requests would have arrived, so the tail does not thin out either.
    """
    steps_mean = (spec.steps[0] + spec.steps[1]) / 2
    share = 1.0 - spec.hot_share
    session_rate = rate * share / steps_mean
    lifetime = spec.steps[1] * spec.think_s[1]
    horizon = n / rate + lifetime
    count = max(1, math.ceil(session_rate * (horizon + lifetime) * 1.2) + 2)
    starts = arrival_times(rng, count, session_rate, spec.arrivals)
    weights = zipf_weights(prompts, spec.zipf)
    out: list[TraceRecord] = []
    for i, start in enumerate(starts):
        out += session(rng, f"s{i}", start - lifetime, rng.choices(range(prompts), weights=weights)[0])
    return [r for r in out if r.t >= 0.0]


def _agent(spec: WorkloadSpec, rate: float, n: int, text_rng: random.Random, rng: random.Random) -> list[TraceRecord]:
    agents = [_text(text_rng, _draw(text_rng, spec.prefix_tokens)) for _ in range(spec.groups)]
    hot = [_text(text_rng, _draw(text_rng, spec.hot_tokens)) for _ in range(spec.hot_prompts)]

    def session(r: random.Random, sid: str, start: float, a: int) -> list[TraceRecord]:
        history: list[dict[str, str]] = [{"role": "system", "content": agents[a]},
                                         {"role": "user", "content": _text(r, _draw(r, spec.question_tokens))}]
        steps = _draw(r, spec.steps)
        outs = output_lengths(r, steps, spec.output)
        t, recs = start, []
        for k in range(steps):
            recs.append(TraceRecord(t, spec.model, outs[k], tuple(dict(m) for m in history), session=sid))
            history.append({"role": "assistant", "content": "call " + _text(r, r.randint(20, _CALL_TOKENS - 1))})
            history.append({"role": "tool", "content": _text(r, _draw(r, spec.tool_tokens))})
            t += r.uniform(*spec.think_s)
        return recs

    out = _sessions(spec, rate, n, rng, session, spec.groups)
    if spec.hot_share > 0 and hot:
        m = max(1, round(n * spec.hot_share * 1.2))
        times = arrival_times(rng, m, rate * spec.hot_share, spec.arrivals)
        outs = output_lengths(rng, m, spec.output)
        picks = rng.choices(range(len(hot)), weights=zipf_weights(len(hot), 1.0), k=m)
        out += [TraceRecord(t, spec.model, o, ({"role": "system", "content": hot[h]},
                                               {"role": "user", "content": _text(rng, _draw(rng, spec.question_tokens))}))
                for t, h, o in zip(times, picks, outs, strict=True)]
    return out


def _chat(spec: WorkloadSpec, rate: float, n: int, text_rng: random.Random, rng: random.Random) -> list[TraceRecord]:
    systems = [_text(text_rng, _draw(text_rng, spec.prefix_tokens)) for _ in range(spec.groups)]

    def session(r: random.Random, sid: str, start: float, s: int) -> list[TraceRecord]:
        history: list[dict[str, str]] = [{"role": "system", "content": systems[s]}]
        steps = _draw(r, spec.steps)
        outs = output_lengths(r, steps, spec.output)
        t, recs = start, []
        for k in range(steps):
            history.append({"role": "user", "content": _text(r, _draw(r, spec.question_tokens))})
            recs.append(TraceRecord(t, spec.model, outs[k], tuple(dict(m) for m in history), session=sid))
            history.append({"role": "assistant", "content": _text(r, outs[k])})
            t += r.uniform(*spec.think_s)
        return recs

    return _sessions(spec, rate, n, rng, session, spec.groups)


def with_requests(spec: WorkloadSpec, requests: int) -> WorkloadSpec:
    return replace(spec, requests=requests)


# The issue's two traces a new user brought (rebuilt from their description: the files were not given).
ISSUE_WORKLOADS: dict[str, WorkloadSpec] = {
    # A few long system prompts with tool schemas, sessions whose histories grow with tool results,
    # plus chat over a few hot prompts.
    "agent-loop": WorkloadSpec(
        structure="agent", requests=600, groups=3, prefix_tokens=(3000, 5000), question_tokens=(50, 200),
        steps=(3, 8), tool_tokens=(200, 1200), think_s=(0.5, 2.0), hot_share=0.3, hot_prompts=4,
        hot_tokens=(800, 1600), zipf=0.5, output=OutputSpec("exp", 96), arrivals=ArrivalSpec("poisson")),
    # A dozen 5-9k-token documents under a few tenants' system prompts, Zipf popularity, short questions.
    "tenant-doc-qa": WorkloadSpec(
        structure="tree", requests=600, systems=3, system_tokens=(300, 600), groups=12,
        prefix_tokens=(5000, 9000), question_tokens=(20, 80), zipf=1.0, output=OutputSpec("uniform", 64),
        arrivals=ArrivalSpec("poisson")),
}


def reusable_tokens(records: Sequence[TraceRecord]) -> int:
    """Prompt tokens in 16-token blocks that occur in two or more requests: what a prefix cache can reuse.

    The sweep sizes KV against this "working set" (every word is one token; template tokens approximate).
    """
    from routing.eval.trace import PromptEncoder
    from simulator.kvcache import block_hashes

    encoder = PromptEncoder()
    seen: dict[int, int] = {}
    for r in records:
        _, ids = encoder.encode(r)
        for h in block_hashes(ids, 16, r.cache_salt, r.lora):
            seen[h] = seen.get(h, 0) + 1
    return 16 * sum(1 for c in seen.values() if c >= 2)
