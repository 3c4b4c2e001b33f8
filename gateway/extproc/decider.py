"""The sidecar's seam onto the gateway: the same admission, state hooks, scheduler and accounting
the proxy runs, with Envoy making the upstream attempts instead of the proxy.

`Decider` is the one protocol the stream handler needs; `GatewayDecider` implements it over the
parts `build_core` makes (the pipeline, the datastore, the circuit breakers). Nothing here decides
anything the proxy path does not decide the same way.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from gateway.config import ExtprocConfig
from gateway.core import Core
from gateway.errors import GatewayError, ServiceUnavailable, to_gateway_error
from gateway.exchange import Exchange
from gateway.extproc.local import LocalAnswer, call_app
from gateway.metrics import UNROUTED
from gateway.openai_requests import ParsedBody
from routing.types import Candidate, evolve

__all__ = ["Decider", "GatewayDecider", "Pick", "PickRequest", "endpoint_address"]

log = logging.getLogger("gravity.extproc")

_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Credentials of the caller are the gateway's business, never the backend's.
_CLIENT_CREDENTIALS = ("authorization", "api-key", "x-api-key", "proxy-authorization")


@dataclass(frozen=True)
class PickRequest:
    route: str
    parsed: ParsedBody
    raw: bytes
    headers: Mapping[str, str]
    subset: list[str] | None
    """`ip:port` endpoints the data plane allows; None when it sent no subset hint."""


@dataclass
class Pick:
    """One admitted, scheduled request: where Envoy should send it and what to send."""

    exchange: Exchange
    addresses: list[str]
    """Ranked `ip:port` fallback list, best first."""
    set_headers: dict[str, str]
    remove_headers: list[str]
    body: bytes
    """The body to send upstream (the client's own unless a documented mutation applies)."""
    scores: dict[str, float] | None = None
    settles: bool = True
    """A token budget waits for this answer's usage (a reservation is held)."""
    echo_request_id: str = ""
    candidates: dict[str, Candidate] = field(default_factory=dict)


class Decider(Protocol):
    """What the ext_proc stream needs from the gateway; tests may supply their own."""

    async def decide(self, req: PickRequest) -> Pick:
        """Admit and schedule; raises the same domain errors the proxy maps to HTTP answers."""
        ...

    async def served(self, pick: Pick, address: str | None) -> None:
        """Envoy reports which endpoint answered (after any failover along the list)."""
        ...

    def first_token(self, pick: Pick) -> None: ...

    async def finish(self, pick: Pick) -> None:
        """Exactly once per decided request: settle budgets, end in-flight accounting, metrics."""
        ...

    async def reject(self, err: GatewayError, pick: Pick | None) -> None:
        """A request answered with an error by the sidecar itself (metrics; refund if admitted)."""
        ...

    async def local(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> LocalAnswer:
        """(status, headers, body) for a route that is not proxied, as `gravity serve` answers it."""
        ...


def endpoint_address(url: str) -> tuple[str, int]:
    """(host, port) of a backend URL, default ports by scheme."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.hostname or "", port


def _format(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class GatewayDecider:
    """The proxy's decision path, answered as an endpoint list instead of an upstream call."""

    def __init__(self, gw: Core, cfg: ExtprocConfig) -> None:
        self.gw = gw
        self.cfg = cfg
        self.address_of: dict[str, str] = {}
        """Endpoint name -> `ip:port` Envoy can connect to (ORIGINAL_DST needs an IP)."""
        self.name_of: dict[str, str] = {}
        self.started = False
        self._app: Any = None
        """Set once the gateway parts run (Redis, upstream session, first scrape)."""

    async def resolve(self, loop: Any) -> None:
        """Map every backend to an IP address once, before serving (Envoy's ORIGINAL_DST and
        override_host match endpoints by `ip:port`)."""
        for name, target in self.gw.targets.items():
            backend = next(b for b in self.gw.cfg.backends if b.name == name)
            host, port = endpoint_address(backend.url)
            try:
                ip = str(ipaddress.ip_address(host))
            except ValueError:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                ip = str(infos[0][4][0])
            address = _format(ip, port)
            self.address_of[name] = address
            self.name_of[address] = name
            del target

    async def local(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> LocalAnswer:
        if self._app is None:
            from gateway.app import create_app

            self._app = create_app(self.gw.cfg, self.gw)  # routes only: the sidecar runs the lifespan
        return await call_app(self._app, method, target, headers, body)

    def _request_id(self, headers: Mapping[str, str]) -> tuple[str, str]:
        """(internal id, id to echo): the internal one is always ours, so a client repeating an id
        cannot alias another request's limiter slot; a sane client id is echoed back."""
        own = os.urandom(16).hex()
        given = headers.get("x-request-id", "")
        return own, given if _SANE_REQUEST_ID.match(given) else own

    async def decide(self, req: PickRequest) -> Pick:
        gw = self.gw
        if not self.started:
            raise ServiceUnavailable("The endpoint picker is starting; try again shortly.", code="not_ready",
                                     retry_after=1)
        internal_id, echo = self._request_id(req.headers)
        ex = gw.pipeline.exchange(req.route, req.parsed, req.raw, req.headers, internal_id, {},
                                  echo if echo != internal_id else None)
        if req.subset is not None:
            eligible = frozenset(self.name_of[a] for a in req.subset if a in self.name_of)
            ex.routing = evolve(ex.routing, eligible=eligible)
        pick = Pick(exchange=ex, addresses=[], set_headers={}, remove_headers=[], body=b"",
                    echo_request_id=echo)
        # A SERVER span for the decision (docs/tracing.md): admission and routing spans are its children.
        with gw.tracing.pick(req.headers, "POST", f"/v1/{req.route}"):
            try:
                await gw.pipeline.prepare(ex, req.headers)
            except Exception as exc:
                await self.reject(to_gateway_error(exc), pick)
                raise
        assert ex.decision is not None
        ranked = self._fallbacks(ex.decision.ranked)
        first = ranked[0]
        pick.candidates = {c.endpoint: c for c in ranked}
        pick.addresses = [self.address_of[c.endpoint] for c in ranked]
        if self.cfg.emit_scores:
            pick.scores = {self.address_of[c.endpoint]: round(c.score, 6) for c in ex.decision.ranked
                           if c.endpoint in self.address_of}
        target = gw.targets[first.endpoint]
        pick.remove_headers = [h for h in _CLIENT_CREDENTIALS if h in req.headers]
        pick.remove_headers += [h for h in req.headers if h.startswith("x-gravity-")]
        if target.auth_header:
            pick.set_headers["authorization"] = target.auth_header
            pick.remove_headers = [h for h in pick.remove_headers if h != "authorization"]
        # Usage must be readable on the way back (settlement): no compressed answers.
        pick.set_headers["accept-encoding"] = "identity"
        path = urlsplit(target.api_base).path + "/" + req.route
        if path != req.headers.get(":path", "").split("?")[0]:
            pick.set_headers[":path"] = path
        pick.body = ex.upstream_body()
        pick.settles = gw.admission.holds(ex)
        self._begin(pick, first)
        return pick

    def _fallbacks(self, ranked: list[Candidate]) -> list[Candidate]:
        """The first candidate and up to `max_fallbacks` more that Envoy can reach the same way:
        one header set serves every attempt, so they must share credential and path prefix."""
        first = self.gw.targets[ranked[0].endpoint]
        out = [ranked[0]]
        for cand in ranked[1:]:
            if len(out) > self.cfg.max_fallbacks:
                break
            t = self.gw.targets[cand.endpoint]
            if t.auth_header == first.auth_header and urlsplit(t.api_base).path == urlsplit(first.api_base).path:
                out.append(cand)
        return out

    def _begin(self, pick: Pick, cand: Candidate) -> None:
        gw, ex = self.gw, pick.exchange
        old = ex.extras.pop("inflight_ticket", None)
        if old is not None:
            gw.datastore.end(old)
        ex.attempts += 1
        ex.extras["inflight_ticket"] = gw.datastore.begin(cand.endpoint, cand.uncached_tokens,
                                                         ex.routing.max_tokens)
        # As the proxy does: teach the prefix index at dispatch, so a burst sees where it went.
        gw.scheduler.observe(ex.routing, cand.endpoint)
        ex.backend = cand.endpoint

    async def served(self, pick: Pick, address: str | None) -> None:
        ex = pick.exchange
        name = self.name_of.get(address) if address else None
        if name is not None and name != ex.backend:
            # Envoy moved on along the list: the endpoints before this one could not take it.
            failed = ex.backend
            cand = pick.candidates.get(name) or Candidate(name, "", 0.0, None, ex.routing.prompt_tokens)
            if failed is not None:
                self.gw.metrics.upstream_errors.labels(failed, "failover").inc()
                # Passive health, as the proxy's own failures feed it: the circuit breaker decides.
                self.gw.circuits.failure(failed)
            self._begin(pick, cand)
        if ex.backend:
            await self.gw.pipeline.picked(ex)

    def first_token(self, pick: Pick) -> None:
        ticket = pick.exchange.extras.get("inflight_ticket")
        if ticket is not None:
            self.gw.datastore.first_token(ticket)

    async def finish(self, pick: Pick) -> None:
        await self.gw.pipeline.finish(pick.exchange)

    async def reject(self, err: GatewayError, pick: Pick | None) -> None:
        if err.code in ("model_not_found", "no_healthy_backend"):
            model = pick.exchange.model if pick is not None and err.code == "no_healthy_backend" else UNROUTED
            self.gw.metrics.routing_errors.labels(model, err.code or "").inc()
        if pick is not None:
            ex = pick.exchange
            ex.status, ex.outcome = err.status, "error"
            await self.gw.pipeline.finish(ex)
