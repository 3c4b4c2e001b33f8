"""GatewayDecider over the real parts `build_core` makes (no Redis: no limits, no sessions): where the
request is accounted when Envoy reports that another endpoint of the list served it."""
from __future__ import annotations

import asyncio
import json

import pytest

from gateway.config import parse_config
from gateway.core import build_core
from gateway.extproc.decider import GatewayDecider, PickRequest
from gateway.openai_requests import parse_body

MODEL = "m"
PROMPT = "a shared system prompt that is long enough to fill several prefix blocks " * 40


async def _decider(**extproc: object) -> GatewayDecider:
    cfg = parse_config({"state": {"redis_url": "redis://127.0.0.1:1/0"},  # never connected
                        "extproc": {"max_fallbacks": 2, **extproc},
                        "backends": [{"name": f"b{i}", "url": f"http://127.0.0.1:{9 + i}", "models": [MODEL]}
                                     for i in range(3)]})
    decider = GatewayDecider(build_core(cfg), cfg.extproc)
    await decider.resolve(asyncio.get_running_loop())
    decider.started = True
    return decider


def _request(content: str = PROMPT, headers: dict[str, str] | None = None) -> PickRequest:
    raw = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}]}).encode()
    return PickRequest("chat/completions", parse_body("chat/completions", raw), raw,
                       {":path": "/v1/chat/completions", **(headers or {})}, None)


def _inflight(d: GatewayDecider) -> dict[str, int]:
    return {n: e.inflight_requests for n, e in d.gw.datastore.snapshot().endpoints.items()}


def _failovers(d: GatewayDecider, backend: str) -> float:
    return d.gw.metrics.registry.get_sample_value(
        "gravity_upstream_errors_total", {"backend": backend, "reason": "failover"}) or 0.0


async def test_served_elsewhere_moves_in_flight_prefix_and_health_to_the_server() -> None:
    d = await _decider()
    pick = await d.decide(_request())
    first = pick.exchange.backend
    assert first is not None and pick.addresses[0] == d.address_of[first] and len(pick.addresses) == 3
    assert _inflight(d)[first] == 1
    other = d.name_of[pick.addresses[1]]
    await d.served(pick, pick.addresses[1])  # Envoy's retry went to the second of the list
    assert pick.exchange.backend == other
    assert _inflight(d) == {**{n: 0 for n in d.address_of}, other: 1}
    assert _failovers(d, first) == 1 and _failovers(d, other) == 0
    # The prefix index learned the server: the same prefix now scores there.
    probe = await d.decide(_request(PROMPT + " another question"))
    assert probe.exchange.decision is not None
    prefix = {c.endpoint: c.scores.get("prefix", 0.0) for c in probe.exchange.decision.ranked}
    untouched = next(n for n in d.address_of if n not in (first, other))
    assert prefix[other] > 0 and prefix[untouched] == 0, prefix
    await d.finish(pick)
    await d.finish(probe)
    assert set(_inflight(d).values()) == {0}


@pytest.mark.parametrize("reported", [None, "same", "127.0.0.1:65000"])
async def test_served_where_picked_or_unknown_changes_nothing(reported: str | None) -> None:
    d = await _decider()
    pick = await d.decide(_request())
    first = pick.exchange.backend
    assert first is not None
    await d.served(pick, pick.addresses[0] if reported == "same" else reported)
    assert pick.exchange.backend == first and _inflight(d)[first] == 1
    assert _failovers(d, first) == 0


async def test_scores_credentials_and_encoding() -> None:
    d = await _decider(emit_scores=True)
    pick = await d.decide(_request(headers={"authorization": "Bearer client", "x-api-key": "k",
                                            "x-gravity-priority": "critical", "accept-encoding": "gzip"}))
    assert pick.scores is not None and set(pick.scores) == set(pick.addresses)
    assert all(0.0 <= s for s in pick.scores.values())
    assert sorted(pick.remove_headers) == ["authorization", "x-api-key", "x-gravity-priority"]
    assert pick.set_headers["accept-encoding"] == "identity"
    assert ":path" not in pick.set_headers  # the backends' prefix is /v1: the client's path stands
    plain = await (await _decider()).decide(_request())
    assert plain.scores is None
