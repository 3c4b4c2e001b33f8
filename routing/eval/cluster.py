"""The virtual-time cluster: trace arrivals, the real scheduler and N simulated engines on one event heap.

Metrics reach the datastore on a scrape period (stale by up to that much); in-flight counts are immediate
for a replica's own dispatches, and other replicas' arrive as shared through Redis when ``shared_inflight``.
"""
from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, cast

from routing.config import RoutingConfig
from routing.datastore import Datastore, InflightTicket
from routing.errors import RoutingError
from routing.eval.faults import FaultEvent, FaultInjector
from routing.eval.kv_feed import KVFeed, KVFeedOptions
from routing.eval.oracle import OracleIndex, oracle_registry
from routing.eval.policies import KV_FEED_POLICIES
from routing.eval.trace import PromptEncoder, TraceRecord
from routing.plugins.registry import Registry
from routing.scheduler import build_scheduler
from routing.types import EndpointMetrics, EndpointSpec, RoutingRequest
from simulator.engine import Engine, EngineConfig, SimRequest, StepOutcome

if TYPE_CHECKING:
    from policies.resilience import ResilienceConfig

__all__ = ["ClusterResult", "EndpointRecord", "RequestRecord", "simulate"]

_ARRIVE, _STEP_DONE, _SCRAPE, _CALL = 0, 1, 2, 3


@dataclass
class RequestRecord:
    request_id: str
    arrival: float
    endpoint: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    e2e: float | None = None
    shed: str | None = None  # why the request never ran
    failed: str | None = None  # why it ran but did not complete (faults: routing/eval/faults.py)
    attempts: int = 0  # counted with faults only, like resumes
    resumes: int = 0


@dataclass
class EndpointRecord:
    name: str
    requests: int = 0
    busy_s: float = 0.0
    prefill_tokens: int = 0
    preemptions: int = 0


@dataclass
class ClusterResult:
    policy: str
    requests: list[RequestRecord]
    endpoints: list[EndpointRecord]
    makespan: float
    decision_latency_s: list[float] = field(default_factory=list)
    kv_events: dict[str, object] | None = None  # the event feed's counters, when the engines published


def simulate(
    records: Sequence[TraceRecord],
    *,
    config: RoutingConfig | Callable[[Registry], RoutingConfig],
    engine: EngineConfig | Sequence[EngineConfig],
    backends: int = 4,
    profile: str | None = None,
    seed: int = 0,
    scrape_interval_s: float = 0.1,
    policy_name: str = "",
    kv_feed: KVFeedOptions | None = None,
    replicas: int = 1,
    faults: Sequence[FaultEvent] | None = None,
    resilience: ResilienceConfig | None = None,
    resume: bool = True,
    shared_inflight: float | None = None,
) -> ClusterResult:
    """Replay ``records`` through the scheduler against ``backends`` engines and return every outcome.

    ``engine`` is one config for every backend, or one per backend (a mixed fleet; ``backends`` is
    then its length).
    ``kv_feed``: the engines publish KV events to an event-fed index (routing/eval/kv_feed.py).
    ``replicas``: that many gateway replicas, each with its own datastore (in-flight counts of its own
    dispatches only) and scheduler, over the same scrapes and events; arrivals go round-robin.
    ``faults``: replicas killed, restarted, stalled or failing (routing/eval/faults.py); requests are then
    dispatched by the gateway's attempt state machine under ``resilience`` (default: the gateway's
    defaults), resuming broken streams unless ``resume`` is False.
    ``shared_inflight``: with replicas, share their in-flight counts as the gateway does through Redis
    (gateway/state/inflight.py): each change of a replica's own counts reaches "Redis" this many seconds
    later, and a replica reads the others' there when a request arrives (its pre-dispatch call), so a
    decision sees the counts as of that call. None: each replica knows only its own dispatches.
    """
    now = 0.0
    clock = lambda: now
    configs = [engine] * backends if isinstance(engine, EngineConfig) else list(engine)
    names = [f"sim-{i}" for i in range(len(configs))]
    if kv_feed is None and policy_name in KV_FEED_POLICIES:
        kv_feed = KVFeedOptions(mode=KV_FEED_POLICIES[policy_name])  # type: ignore[arg-type]
    feed = KVFeed(kv_feed, lambda t, fn: push(t, _CALL, fn), clock) if kv_feed is not None else None

    def make_engine(i: int) -> Engine:
        return Engine(replace(configs[i], seed=configs[i].seed + i), kv_events=feed.recorder(names[i]) if feed else None)

    engines = {n: make_engine(i) for i, n in enumerate(names)}
    tokens: dict[str, list[int]] = {}
    oracle = OracleIndex(engines, lambda r: tokens.get(r.request_id, []))
    registry = oracle_registry(oracle)
    if feed is not None:
        feed.register(registry, lambda r: tokens.get(r.request_id, []))
    cfg = config(registry) if callable(config) else config
    models = frozenset(r.model for r in records)
    stores = [Datastore(clock, stale_after_s=cfg.stale_after_s) for _ in range(max(1, replicas))]
    for store in stores:
        for n in names:
            store.upsert(EndpointSpec(n, f"sim://{n}", models))
    # What "Redis" holds: each replica's own (requests, prompt tokens awaiting prefill) per endpoint.
    shared: list[dict[str, tuple[int, int]]] = [{} for _ in stores]

    def publish(r: int, name: str) -> None:
        counts = stores[r].own_inflight(name)
        push(now + (shared_inflight or 0.0), _CALL, lambda: shared[r].__setitem__(name, counts))

    if shared_inflight is not None and len(stores) > 1:
        for rep, store in enumerate(stores):
            store.add_inflight_listener(lambda name, rep=rep: publish(rep, name))  # type: ignore[misc]

    def read_shared(r: int) -> None:
        others: dict[str, tuple[int, int]] = {}
        for q, counts in enumerate(shared):
            if q != r:
                for name, (n, tok) in counts.items():
                    was = others.get(name, (0, 0))
                    others[name] = (was[0] + n, was[1] + tok)
        stores[r].set_foreign_inflight(others)

    schedulers = [build_scheduler(cfg, store, rng=random.Random(seed + r), clock=clock, registry=registry,
                                  kv_events=feed.state if feed else None) for r, store in enumerate(stores)]

    encoder = PromptEncoder()
    out = [RequestRecord(f"r{i}", r.t) for i, r in enumerate(records)]
    per_ep = {n: EndpointRecord(n) for n in names}
    tickets: dict[str, tuple[RequestRecord, InflightTicket, Datastore]] = {}
    sessions: dict[str, str] = {}  # what the gateway keeps in Redis
    busy: set[str] = set()
    latencies: list[float] = []
    heap: list[tuple[float, int, int, object]] = []
    seq = 0

    def push(t: float, kind: int, payload: object) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(heap, (t, seq, kind, payload))

    def start_step(name: str) -> None:
        eng = engines[name]
        if not eng.has_work() or (inj is not None and not inj.runs(name)):
            busy.discard(name)
            return
        outcome = eng.step(now)
        busy.add(name)
        per_ep[name].busy_s += outcome.duration if outcome.num_prefill_tokens or outcome.num_decode_seqs else 0.0
        per_ep[name].prefill_tokens += outcome.num_prefill_tokens
        push(now + max(outcome.duration, 1e-6), _STEP_DONE, (name, outcome))

    def finish_step(name: str, outcome: StepOutcome) -> None:
        if inj is not None:
            inj.step_done(name, outcome)
            start_step(name)
            return
        for ev in outcome.events:
            rec, ticket, ds = tickets[ev.request_id]
            rec.output_tokens += len(ev.token_ids)
            if ev.is_first:
                rec.ttft = ev.time - rec.arrival
                rec.cached_tokens = ev.num_cached_tokens
                ds.first_token(ticket)
                oracle.prefilled(ev.request_id)
            if ev.finished:
                rec.e2e = ev.time - rec.arrival
                ds.end(ticket)
                del tickets[ev.request_id]
        start_step(name)

    def arrive(i: int) -> None:
        record, rec = records[i], out[i]
        scheduler, ds = schedulers[i % len(schedulers)], stores[i % len(stores)]
        prompt, ids = encoder.encode(record)
        rec.prompt_tokens = len(ids)
        tokens[rec.request_id] = ids
        req = RoutingRequest(
            model=record.model, prompt=prompt, session_id=record.session,
            session_endpoint=sessions.get(record.session) if record.session else None,
            cache_salt=record.cache_salt, lora=record.lora, prompt_tokens=len(ids),
            max_tokens=record.max_tokens, request_id=rec.request_id, profile=profile,
        )
        if shared_inflight is not None and len(stores) > 1:
            read_shared(i % len(stores))
        if inj is not None:
            inj.arrive(i, rec, req, record, ids)
            tokens.pop(rec.request_id, None)
            return
        try:
            decision = scheduler.schedule(req)
        except RoutingError as exc:
            rec.shed = exc.code
            return
        latencies.append(decision.latency_s)
        target = decision.best.endpoint
        uncached = decision.best.uncached_tokens
        scheduler.observe(req, target)
        tokens.pop(rec.request_id, None)
        try:
            engines[target].add_request(SimRequest(rec.request_id, ids, record.max_tokens, arrival=now,
                                                   cache_salt=record.cache_salt, lora=record.lora))
        except ValueError:
            rec.shed = "rejected_by_engine"
            oracle.prefilled(rec.request_id)
            return
        rec.endpoint = target
        per_ep[target].requests += 1
        if record.session:
            sessions[record.session] = target
        tickets[rec.request_id] = (rec, ds.begin(target, uncached, record.max_tokens), ds)
        if target not in busy:
            start_step(target)

    def scrape() -> None:
        for n, eng in engines.items():
            if inj is not None and not inj.scraped(n):
                continue
            st = eng.stats()
            metrics = EndpointMetrics(
                waiting=st.num_waiting, running=st.num_running, kv_usage=st.kv_cache_usage,
                prefix_queries_total=float(st.prefix_cache_queries), prefix_hits_total=float(st.prefix_cache_hits),
                requests_total=float(st.requests_finished_total),
                kv_capacity_tokens=eng.config.kv_blocks * eng.config.block_size,
                loras_running=frozenset(st.running_loras), loras_waiting=frozenset(st.waiting_loras),
                max_loras=eng.config.max_loras,
            )
            for store in stores:
                store.update_metrics(n, metrics)
        if tickets or pending_arrivals or (inj is not None and inj.busy()):
            push(now + scrape_interval_s, _SCRAPE, None)

    def kick(name: str) -> None:
        if name not in busy:
            start_step(name)

    inj = None if faults is None else FaultInjector(
        faults, names=names, engines=engines, stores=stores, schedulers=schedulers, clock=clock,
        schedule=lambda t, fn: push(t, _CALL, fn), kick=kick, new_engine=lambda n: make_engine(names.index(n)),
        per_endpoint=per_ep, sessions=sessions, latencies=latencies, resilience=resilience, resume=resume)

    for i, r in enumerate(records):
        push(r.t, _ARRIVE, i)
    pending_arrivals = len(records)
    scrape()
    while heap:
        now, _, kind, payload = heapq.heappop(heap)
        if kind == _ARRIVE:
            pending_arrivals -= 1
            arrive(cast(int, payload))
        elif kind == _STEP_DONE:
            step_of, outcome = cast(tuple[str, StepOutcome], payload)
            finish_step(step_of, outcome)
        elif kind == _CALL:
            cast(Callable[[], None], payload)()
        else:
            scrape()
    for n, eng in engines.items():
        per_ep[n].preemptions = eng.stats().num_preemptions_total
    kv = None if feed is None else {**feed.state.describe(), "published": feed.published, "lost": feed.lost}
    return ClusterResult(policy_name, out, list(per_ep.values()), now, latencies, kv)
