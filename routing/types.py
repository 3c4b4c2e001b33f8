"""Value types shared by the datastore, the scheduler, its plugins and the evaluator.

Nothing here knows about HTTP; the gateway, ext_proc and the virtual-time evaluator all build these.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from routing.latency import PRIOR, TTFTCoefficients

__all__ = [
    "Candidate",
    "Decision",
    "EndpointMetrics",
    "EndpointSpec",
    "EndpointView",
    "LatencyPrediction",
    "PrefixMatch",
    "RoutingRequest",
    "ScoreTable",
    "Snapshot",
    "evolve",
]

_T = TypeVar("_T")


class _Factory:
    def __repr__(self) -> str:
        return "<factory>"  # what a signature shows, as for the generated __init__


_UNSET = _Factory()


def _one_write_init(cls: type[_T]) -> type[_T]:
    """Give a frozen dataclass an ``__init__`` that sets the instance dict in one write.

    The generated one calls ``object.__setattr__`` once per field (frozen), ~4x the cost of building
    the dict; views and requests are built on every decision. Same signature, defaults and result.
    """
    params, defaults, items = [], {}, []
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__}: __post_init__ is not supported")
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not f.init:
            raise TypeError(f"{cls.__name__}.{f.name}: init=False fields are not supported")
        value = f.name
        if f.default_factory is not dataclasses.MISSING:
            # As the generated __init__ does: a sentinel default, and the factory called per instance.
            defaults[f"_factory_{f.name}"] = f.default_factory
            params.append(f"{f.name}=_unset")
            value = f"_factory_{f.name}() if {f.name} is _unset else {f.name}"
        elif f.default is dataclasses.MISSING:
            params.append(f.name)
        else:
            defaults[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
        items.append(f"{f.name!r}: {value}")
    namespace: dict[str, Any] = {"_set": object.__setattr__, "_unset": _UNSET, **defaults}
    exec(f"def __init__(self, {', '.join(params)}):\n    _set(self, '__dict__', {{{', '.join(items)}}})\n",  # noqa: S102
         namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    init.__annotations__ = {**{f.name: f.type for f in dataclasses.fields(cls)}, "return": None}  # type: ignore[arg-type]
    cls.__init__ = init  # type: ignore[method-assign]
    return cls


def evolve(obj: _T, **changes: Any) -> _T:
    """``dataclasses.replace`` for the classes built with ``_one_write_init`` (EndpointView, Snapshot,
    RoutingRequest, PrefixMatch): a copy of the instance dict with ``changes`` applied, without
    running ``__init__`` again (~1 us against ~7 us; the request path evolves a RoutingRequest several
    times per request). Their ``__init__`` only stores the fields, so the result is the same object
    ``replace`` builds; an unknown field name is a TypeError, as it is for ``replace``."""
    fields = obj.__dict__
    if not changes.keys() <= fields.keys():
        raise TypeError(f"{type(obj).__name__} has no field {sorted(changes.keys() - fields.keys())}")
    out = object.__new__(type(obj))
    object.__setattr__(out, "__dict__", {**fields, **changes})
    return out


@dataclass(frozen=True)
class EndpointSpec:
    """A configured backend. ``models=None`` means discover them from ``models_url``."""

    name: str
    url: str
    models: frozenset[str] | None = None
    # vLLM serves /v1/models and /metrics at the root; KServe puts OpenAI routes under /openai/v1,
    # so the gateway fills these in per endpoint and the collector never guesses.
    models_url: str | None = None
    metrics_url: str | None = None
    scrape_metrics: bool = True
    """False for backends without vLLM metrics (a hosted OpenAI-compatible API): routed on the
    gateway's own in-flight counts, healthy unless requests to it fail."""

    def resolved_metrics_url(self) -> str:
        return self.metrics_url or self.url.rstrip("/") + "/metrics"

    def resolved_models_url(self) -> str:
        return self.models_url or self.url.rstrip("/") + "/v1/models"


@dataclass(frozen=True)
class EndpointMetrics:
    """What one scrape says about an endpoint (summed over the models it serves).

    Counters are kept raw (monotonic totals) so the datastore can detect a restart when one goes
    backwards; ``updated_at`` is stamped by the datastore with its own clock.
    """

    waiting: int = 0
    running: int = 0
    kv_usage: float | None = None  # fraction in [0, 1]; None when the engine does not report it
    prefix_queries_total: float | None = None  # tokens looked up in the prefix cache
    prefix_hits_total: float | None = None  # tokens found there
    requests_total: float | None = None  # finished requests, any reason
    kv_capacity_tokens: int | None = None  # num_gpu_blocks * block_size from cache_config_info
    loras_running: frozenset[str] = frozenset()
    loras_waiting: frozenset[str] = frozenset()
    max_loras: int = 0
    process_start_time: float | None = None
    updated_at: float = 0.0


def pending_prefill(inflight_prompt_tokens: int, rate: float, anchor_at: float, anchor_tokens: int,
                    now: float) -> float:
    """Prompt tokens awaiting prefill net of ``rate`` x time since the anchor (see EndpointView)."""
    pending = float(inflight_prompt_tokens)
    if pending <= 0 or rate <= 0:
        return pending
    left = anchor_tokens - rate * (now - anchor_at)
    # min(pending, max(0.0, left)) with one builtin call fewer: this runs per endpoint per request.
    if not left > 0.0:  # also NaN
        return 0.0
    return min(pending, left)


@_one_write_init
@dataclass(frozen=True)
class EndpointView:
    """An immutable copy of one endpoint's state inside a :class:`Snapshot`."""

    name: str
    url: str
    models: frozenset[str] | None  # None until discovered
    loras: frozenset[str]
    healthy: bool
    health_reason: str
    circuit_open: bool
    metrics: EndpointMetrics | None  # None until the first scrape
    fresh: bool  # metrics present and younger than stale_after_s
    inflight_requests: int  # this replica's own plus foreign_requests
    inflight_prompt_tokens: int  # this replica's own, awaiting prefill
    inflight_decode_tokens: int
    generation: int  # bumped on every detected restart
    # Backlog estimate: measured prefill rate (0: unknown), and since when (the last first token or the
    # start of the backlog) how many prompt tokens have been pending (then plus dispatched since).
    prefill_tokens_per_s: float = 0.0
    prefill_anchor_at: float = 0.0
    prefill_anchor_tokens: int = 0
    ttft: TTFTCoefficients = PRIOR  # this endpoint's fitted TTFT model (routing/latency.py)
    # Other gateway replicas' in-flight requests and prompt tokens awaiting prefill here, shared
    # through Redis as of this replica's last pre-dispatch read (0 with one gateway).
    foreign_requests: int = 0
    foreign_prompt_tokens: int = 0
    # The most requests counted in flight here (own + foreign) between the scrape before the last one
    # and the last one: what the last scrape's queue can hold of the gateways' own requests.
    inflight_at_scrape: int = 0

    def pending_prefill_tokens(self, now: float, rate_fraction: float = 1.0) -> float:
        """Prompt tokens still to prefill: this replica's own net of the progress the measured rate implies
        since the anchor (a fluid FIFO estimate; the raw count when the rate is unknown or disabled), plus
        the other replicas' as they shared them (raw: their anchors are on their clocks)."""
        return pending_prefill(self.inflight_prompt_tokens, self.prefill_tokens_per_s * rate_fraction,
                               self.prefill_anchor_at, self.prefill_anchor_tokens, now) + self.foreign_prompt_tokens

    def unaccounted_waiting(self) -> int:
        """Scraped waiting requests that no gateway replica counts in flight: someone else's traffic.

        The scrape is older than the counts: requests it saw waiting may have finished since, so what it
        is compared with is the larger of the counts now and the peak count around the scrape."""
        m = self.trusted_metrics()
        if m is None:
            return 0
        counted = self.inflight_requests if self.inflight_requests > self.inflight_at_scrape else self.inflight_at_scrape  # noqa: FURB136 - hot path
        return m.waiting - counted if m.waiting > counted else 0

    def serves(self, model: str) -> bool:
        return self.models is not None and (model in self.models or model in self.loras)

    def trusted_metrics(self) -> EndpointMetrics | None:
        """Scraped metrics only when fresh: stale numbers are worse than none."""
        return self.metrics if self.fresh else None


@_one_write_init
@dataclass(frozen=True)
class Snapshot:
    """A point-in-time clone of the datastore; scheduling never reads live state."""

    endpoints: Mapping[str, EndpointView]
    taken_at: float

    def __iter__(self) -> Iterator[EndpointView]:
        return iter(self.endpoints.values())

    def __len__(self) -> int:
        return len(self.endpoints)


@_one_write_init
@dataclass(frozen=True)
class RoutingRequest:
    """What the scheduler needs to know about one inference request."""

    model: str
    prompt: bytes  # rendered prompt text, hashed in byte blocks (no tokenizer on the hot path)
    session_id: str | None = None
    session_endpoint: str | None = None  # affinity hint the gateway looked up in Redis
    cache_salt: str | None = None
    lora: str | None = None
    prompt_tokens: int = 0  # estimate
    max_tokens: int = 0
    priority: str = "standard"
    request_id: str = ""
    profile: str | None = None  # None selects RoutingConfig.default_profile
    eligible: frozenset[str] | None = None
    """Endpoint names this request may go to (the ext_proc subset hint); None: every endpoint."""
    # The OpenAI route ("chat/completions", "completions") and body, for producers that must render and
    # tokenize the prompt exactly as the engine will (precise prefix keys from KV events, routing/kv/).
    route: str = ""
    body: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)


@_one_write_init
@dataclass(frozen=True)
class PrefixMatch:
    """The prefix producer's output for one cycle: where the prompt is believed cached.

    Written once per cycle by the prefix scorer (``CycleContext.prefix``) and read by cost scorers and by
    the scheduler (``Candidate.uncached_tokens``), so no consumer depends on a producer's module.
    """

    cached: Mapping[str, float]  # endpoint -> fraction of the prompt believed cached there, in [0, 1]
    home: str | None = None  # where a prefix cached nowhere should start (rendezvous owner), if any
    # Recent share of traffic whose prompt starts with this prompt's first block (0 when not tracked):
    # a prefix carrying more than a replica's fair share is worth copying.
    share: float = 0.0
    # endpoint -> fraction of its prefix cache believed free (holding nothing the gateway sent), when the
    # producer tracks it: a copy there evicts nothing. Empty when not tracked.
    free: Mapping[str, float] = field(default_factory=dict)

    def fraction(self, endpoint: str) -> float:
        return self.cached.get(endpoint, 0.0)

    @property
    def best(self) -> float:
        return max(self.cached.values(), default=0.0)


@dataclass(frozen=True)
class LatencyPrediction:
    """Predicted time to first token per endpoint, in seconds (``CycleContext.latency``)."""

    ttft_s: Mapping[str, float]


class ScoreTable:
    """Each scorer's clamped, unweighted scores for one cycle's endpoints, stored column by column.

    The scheduler fills one per decision and hands it to every candidate; a candidate's ``scores``
    dict is built from its row only when someone reads it (the debug header, traces, tests).
    """

    __slots__ = ("columns", "endpoints", "names")

    def __init__(self, endpoints: Sequence[EndpointView]) -> None:
        self.endpoints = endpoints
        self.names: list[str] = []
        self.columns: list[Sequence[float]] = []

    def add(self, name: str, column: Sequence[float]) -> None:
        self.names.append(name)
        self.columns.append(column)

    def row(self, endpoint: str) -> dict[str, float]:
        i = next(i for i, e in enumerate(self.endpoints) if e.name == endpoint)
        # A scorer listed twice keeps its first position and its last value, as repeated assignment would.
        return {name: column[i] for name, column in zip(self.names, self.columns, strict=True)}


class Candidate:
    """One ranked endpoint: the weighted total and each scorer's clamped, unweighted score.

    ``scores`` may be given as a :class:`ScoreTable`; the candidate's row is then read on first access.
    """

    __slots__ = ("_scores", "endpoint", "score", "uncached_tokens", "url")

    def __init__(
        self,
        endpoint: str,
        url: str,
        score: float,
        scores: dict[str, float] | ScoreTable | None = None,
        # Prompt tokens expected to need prefill there (the prompt minus the believed-cached prefix);
        # pass it to Datastore.begin so in-flight prefill load is not inflated by cache hits.
        uncached_tokens: int = 0,
    ) -> None:
        self.endpoint = endpoint
        self.url = url
        self.score = score
        self._scores = scores
        self.uncached_tokens = uncached_tokens

    @property
    def scores(self) -> dict[str, float]:
        scores = self._scores
        if not isinstance(scores, dict):
            scores = self._scores = {} if scores is None else scores.row(self.endpoint)
        return scores

    @scores.setter
    def scores(self, value: dict[str, float]) -> None:
        self._scores = value

    def _key(self) -> tuple[str, str, float, dict[str, float], int]:
        return (self.endpoint, self.url, self.score, self.scores, self.uncached_tokens)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Candidate):
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it replaced

    def __repr__(self) -> str:
        return (f"Candidate(endpoint={self.endpoint!r}, url={self.url!r}, score={self.score!r}, "
                f"scores={self.scores!r}, uncached_tokens={self.uncached_tokens!r})")


@dataclass
class Decision:
    """The scheduler's answer: candidates best first, so the resilience layer can retry down it."""

    model: str
    profile: str
    ranked: list[Candidate]
    latency_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # plugin name -> seconds
    prefix: PrefixMatch | None = field(default=None, compare=False, repr=False)
    """The prefix producer's output for this decision (None when no producer ran), for metrics and traces."""
    weights: tuple[tuple[str, float], ...] = field(default=(), compare=False, repr=False)
    """The profile's (scorer, weight) pairs, so a reader can tell which scorer decided the pick."""

    @property
    def best(self) -> Candidate:
        return self.ranked[0]

    def header(self, limit: int = 3) -> str:
        """Compact form for the ``x-gravity-route`` debug header."""
        parts = []
        for c in self.ranked[:limit]:
            detail = ",".join(f"{k}={v:.2f}" for k, v in c.scores.items())
            parts.append(f"{c.endpoint};score={c.score:.3f}" + (f";{detail}" if detail else ""))
        return f"profile={self.profile} " + " ".join(parts)
