"""Metrics scraping: a pure parser of vLLM's Prometheus text and an async collector that polls endpoints.

The collector takes an injected ``fetch(url) -> (status, text)`` so routing carries no HTTP client types.
"""
from __future__ import annotations

import asyncio
import errno
import json
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from routing.datastore import Datastore
from routing.types import EndpointMetrics, EndpointSpec

__all__ = ["Collector", "Fetch", "is_connection_refused", "merge_metrics", "parse_model_cards", "parse_models",
           "parse_vllm_metrics"]

Fetch = Callable[[str], Awaitable[tuple[int, str]]]

_GAUGES = {
    "vllm:num_requests_waiting": "waiting",
    "vllm:num_requests_running": "running",
    "vllm:kv_cache_usage_perc": "kv_usage",
    "vllm:gpu_cache_usage_perc": "kv_usage",  # vLLM < 0.10 name
    "vllm:prefix_cache_queries_total": "prefix_queries_total",
    "vllm:prefix_cache_hits_total": "prefix_hits_total",
    "vllm:gpu_prefix_cache_queries_total": "prefix_queries_total",
    "vllm:gpu_prefix_cache_hits_total": "prefix_hits_total",
}
# The model-less sample set: process metrics and info gauges that older vLLMs emit without model_name.
_ENDPOINT_WIDE = ""


@dataclass(frozen=True)
class _Sample:
    name: str
    labels: dict[str, str]
    value: float


def _parse_labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " ,":
            i += 1
        eq = text.find("=", i)
        if eq < 0:
            break
        key = text[i:eq].strip()
        i = eq + 1
        if i >= n or text[i] != '"':
            raise ValueError("label value must be quoted")
        i += 1
        out: list[str] = []
        while i < n and text[i] != '"':
            if text[i] == "\\" and i + 1 < n:
                nxt = text[i + 1]
                out.append({"n": "\n", "\\": "\\", '"': '"'}.get(nxt, nxt))
                i += 2
            else:
                out.append(text[i])
                i += 1
        labels[key] = "".join(out)
        i += 1
    return labels


def _samples(text: str) -> Iterator[_Sample]:
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            if "{" in line:
                name, rest = line.split("{", 1)
                label_text, tail = rest.rsplit("}", 1)
                labels = _parse_labels(label_text)
            else:
                name, tail = line.split(None, 1)
                labels = {}
            value = float(tail.split()[0])
        except (ValueError, IndexError):
            continue  # one malformed line must not blind us to the rest
        if math.isnan(value):
            continue
        yield _Sample(name.strip(), labels, value)


def _split(value: str) -> frozenset[str]:
    return frozenset(p for p in (x.strip() for x in value.split(",")) if p)


def parse_vllm_metrics(text: str) -> dict[str, EndpointMetrics]:
    """Parse vLLM ``/metrics`` text into one :class:`EndpointMetrics` per ``model_name``.

    Samples without a ``model_name`` label (``process_start_time_seconds``, older info gauges) apply
    to every model; if nothing carries a model name the result has a single ``""`` key.
    """
    fields: dict[str, dict[str, float]] = {}
    extras: dict[str, dict[str, object]] = {}
    lora_seen: dict[str, float] = {}
    for s in _samples(text):
        model = s.labels.get("model_name", _ENDPOINT_WIDE)
        attr = _GAUGES.get(s.name)
        if attr is not None:
            bucket = fields.setdefault(model, {})
            # Several engines behind one URL (data parallel) add up; utilisation is the worst one.
            if attr == "kv_usage":
                bucket[attr] = max(bucket.get(attr, 0.0), s.value)
            else:
                bucket[attr] = bucket.get(attr, 0.0) + s.value
        elif s.name == "vllm:request_success_total":
            bucket = fields.setdefault(model, {})
            bucket["requests_total"] = bucket.get("requests_total", 0.0) + s.value
        elif s.name == "process_start_time_seconds":
            extras.setdefault(_ENDPOINT_WIDE, {})["process_start_time"] = s.value
        elif s.name == "vllm:cache_config_info":
            try:
                cap = int(s.labels["num_gpu_blocks"]) * int(s.labels["block_size"])
            except (KeyError, ValueError):
                continue
            extras.setdefault(model, {})["kv_capacity_tokens"] = cap
        elif s.name == "vllm:lora_requests_info":
            # The gauge's value is a timestamp; the newest sample is the current adapter state.
            if s.value < lora_seen.get(model, -math.inf):
                continue
            lora_seen[model] = s.value
            extra = extras.setdefault(model, {})
            extra["loras_running"] = _split(s.labels.get("running_lora_adapters", ""))
            extra["loras_waiting"] = _split(s.labels.get("waiting_lora_adapters", ""))
            try:
                extra["max_loras"] = int(s.labels.get("max_lora", "0"))
            except ValueError:
                extra["max_loras"] = 0
    models = set(fields) | set(extras)
    if len(models) > 1:
        models.discard(_ENDPOINT_WIDE)
    shared = extras.get(_ENDPOINT_WIDE, {})
    out: dict[str, EndpointMetrics] = {}
    for model in models:
        f = fields.get(model, {})
        extra = {**shared, **extras.get(model, {})}
        out[model] = EndpointMetrics(
            waiting=int(f.get("waiting", 0)),
            running=int(f.get("running", 0)),
            kv_usage=f.get("kv_usage"),
            prefix_queries_total=f.get("prefix_queries_total"),
            prefix_hits_total=f.get("prefix_hits_total"),
            requests_total=f.get("requests_total"),
            **extra,  # type: ignore[arg-type]
        )
    return out


def merge_metrics(per_model: dict[str, EndpointMetrics]) -> EndpointMetrics:
    """Fold per-model metrics into one endpoint view: queues add up, utilisation takes the max."""
    items = list(per_model.values())
    if not items:
        return EndpointMetrics()
    if len(items) == 1:
        return items[0]

    def total(attr: str) -> float | None:
        vals = [getattr(m, attr) for m in items if getattr(m, attr) is not None]
        return sum(vals) if vals else None

    usages = [m.kv_usage for m in items if m.kv_usage is not None]
    caps = [m.kv_capacity_tokens for m in items if m.kv_capacity_tokens is not None]
    starts = [m.process_start_time for m in items if m.process_start_time is not None]
    return EndpointMetrics(
        waiting=sum(m.waiting for m in items),
        running=sum(m.running for m in items),
        kv_usage=max(usages) if usages else None,
        prefix_queries_total=total("prefix_queries_total"),
        prefix_hits_total=total("prefix_hits_total"),
        requests_total=total("requests_total"),
        kv_capacity_tokens=max(caps) if caps else None,
        loras_running=frozenset().union(*(m.loras_running for m in items)),
        loras_waiting=frozenset().union(*(m.loras_waiting for m in items)),
        max_loras=max(m.max_loras for m in items),
        process_start_time=max(starts) if starts else None,
    )


def parse_models(text: str) -> tuple[set[str], set[str]]:
    """Parse an OpenAI ``/v1/models`` body into (base models, LoRA adapters).

    vLLM lists adapters as models whose ``parent`` names the base model.
    """
    models, bases = parse_model_cards(text)
    return models, set(bases)


def parse_model_cards(text: str) -> tuple[set[str], dict[str, str]]:
    """Parse an OpenAI ``/v1/models`` body into (base models, {LoRA adapter: its base model})."""
    body = json.loads(text)
    models: set[str] = set()
    loras: dict[str, str] = {}
    for item in body.get("data", []):
        model_id = item.get("id")
        if not isinstance(model_id, str):
            continue
        parent = item.get("parent")
        if parent:
            loras[model_id] = str(parent)
        else:
            models.add(model_id)
    return models, loras


def is_connection_refused(exc: BaseException) -> bool:
    """True when ``exc`` or anything it was raised from is a refused TCP connection.

    HTTP clients wrap the socket error (aiohttp's ``ClientConnectorError`` is an ``OSError`` carrying
    the errno), so the chain and the errno are both checked; no client types are imported here.
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ConnectionRefusedError) or (isinstance(cur, OSError) and cur.errno == errno.ECONNREFUSED):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


class Collector:
    """Polls every endpoint's metrics (and model list, when not configured) concurrently.

    Health has hysteresis: an endpoint turns unhealthy only after ``unhealthy_after`` consecutive
    failed scrapes (a timeout on a loaded host is not an outage), except a refused connection, which
    means nothing listens and counts at once. One successful scrape restores it.

    The gateway's lifespan owns the task running :meth:`run`; tests and the evaluator call
    :meth:`refresh_once` directly.
    """

    def __init__(
        self,
        datastore: Datastore,
        fetch: Fetch,
        interval_s: float = 0.1,
        timeout_s: float = 0.5,
        *,
        discovery_interval_s: float = 10.0,
        unhealthy_after: int = 3,
        probed: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if unhealthy_after < 1:
            raise ValueError("unhealthy_after must be at least 1")
        self._ds = datastore
        self._unhealthy_after = unhealthy_after
        self._failures: dict[str, int] = {}
        self._fetch = fetch
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._discovery_interval_s = discovery_interval_s
        self._clock = clock
        self._discovered_at: dict[str, float] = {}
        self._probed = probed
        """Health probes (routing/health.py) judge endpoints whose scrapes fail without refusing."""

    async def refresh_once(self) -> None:
        specs = self._ds.specs()
        await asyncio.gather(*(self._refresh(spec) for spec in specs))

    async def run(self) -> None:
        while True:
            started = self._clock()
            await self.refresh_once()
            await asyncio.sleep(max(0.0, self._interval_s - (self._clock() - started)))

    async def _get(self, url: str) -> str:
        status, text = await asyncio.wait_for(self._fetch(url), self._timeout_s)
        if status != 200:
            raise _ScrapeFailed(f"HTTP {status} from {url}")
        return text

    async def _refresh(self, spec: EndpointSpec) -> None:
        try:
            if spec.models is None and self._discovery_due(spec.name):
                models, bases = parse_model_cards(await self._get(spec.resolved_models_url()))
                self._ds.set_models(spec.name, models, set(bases), bases)
                self._discovered_at[spec.name] = self._clock()
            if not spec.scrape_metrics:
                self._failures.pop(spec.name, None)
                self._ds.set_healthy(spec.name, True)
                return
            text = await self._get(spec.resolved_metrics_url())
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            self._failed(spec.name, "scrape timed out", immediate=False)
            return
        except Exception as exc:  # noqa: BLE001 - any failure to scrape counts against health
            reason = f"scrape failed: {type(exc).__name__}: {exc}"[:200]
            self._failed(spec.name, reason, immediate=is_connection_refused(exc))
            return
        per_model = parse_vllm_metrics(text)
        self._ds.update_metrics(spec.name, merge_metrics(per_model))
        self._failures.pop(spec.name, None)
        self._ds.set_healthy(spec.name, True)

    def _failed(self, name: str, reason: str, *, immediate: bool) -> None:
        count = self._failures.get(name, 0) + 1
        self._failures[name] = count
        # A refused connection means nothing listens. Anything else (a slow or failing scrape) only
        # leaves the metrics stale, i.e. the load unknown; with health probes on, they decide health.
        if immediate or (not self._probed and count >= self._unhealthy_after):
            self._ds.set_healthy(name, False, reason if count == 1 else f"{reason} ({count} in a row)")
            # Rediscover models after recovery: the endpoint may have been redeployed.
            self._discovered_at.pop(name, None)

    def consecutive_failures(self, name: str) -> int:
        """Failed scrapes of ``name`` since its last success (0 when healthy)."""
        return self._failures.get(name, 0)

    def _discovery_due(self, name: str) -> bool:
        last = self._discovered_at.get(name)
        return last is None or self._clock() - last >= self._discovery_interval_s


class _ScrapeFailed(Exception):
    pass
