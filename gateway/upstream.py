"""The shared aiohttp client for every backend call (data path, scraping, discovery).

aiohttp rather than httpx: measured ~19x the throughput here (docs/decisions/0001-aiohttp.md).
"""
from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from gateway.config import BackendConfig, ServerConfig
from gateway.rawclient import RawPool
from policies.resilience import ResilienceConfig

# Never forwarded upstream: hop-by-hop headers (RFC 9110 7.6.1), the gateway's own credentials,
# what the client may not assert about itself (its address, where to route), and what we recompute.
_DROP_REQUEST = frozenset({
    "host", "content-length", "connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
    "trailer", "upgrade", "proxy-authorization", "proxy-authenticate", "authorization", "api-key",
    "x-api-key", "accept-encoding", "expect", "cookie", "forwarded", "x-real-ip", "x-request-id",
})
_DROP_PREFIXES = ("x-gravity-", "x-forwarded-", "x-gateway-destination-endpoint")
_DROP_RESPONSE = frozenset({
    "content-length", "connection", "keep-alive", "proxy-connection", "transfer-encoding", "trailer",
    "upgrade", "te", "server", "date", "content-encoding", "set-cookie",
    "x-request-id",  # the gateway sets its own x-request-id on every response
})


class TrustedProxies:
    """Peers whose `X-Forwarded-For`/`-Proto` the gateway extends instead of replacing."""

    def __init__(self, cidrs: list[str]) -> None:
        self._nets = [ipaddress.ip_network(c, strict=False) for c in cidrs]

    def trusts(self, host: str) -> bool:
        if not self._nets:
            return False
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(addr in net for net in self._nets)


def forwardable_request_headers(headers: list[tuple[bytes, bytes]], peer: str | None = None,
                                scheme: str = "http", trusted: TrustedProxies | None = None) -> dict[str, str]:
    """The client's headers as they may go upstream, with `X-Forwarded-For`/`-Proto` from the real peer."""
    out: dict[str, str] = {}
    hop: set[str] = set()
    xff = xfp = None
    for k, v in headers:
        name = k.decode("latin-1").lower()
        if name == "connection":
            hop.update(t.strip().lower() for t in v.decode("latin-1").split(","))
        elif name == "x-forwarded-for":
            xff = v.decode("latin-1") if xff is None else f"{xff}, {v.decode('latin-1')}"
        elif name == "x-forwarded-proto":
            xfp = v.decode("latin-1")
        if name not in _DROP_REQUEST and not name.startswith(_DROP_PREFIXES):
            out[name] = v.decode("latin-1")
    for name in hop:
        out.pop(name, None)
    if peer is not None:
        from_proxy = trusted is not None and trusted.trusts(peer)
        out["x-forwarded-for"] = f"{xff}, {peer}" if from_proxy and xff else peer
        out["x-forwarded-proto"] = xfp if from_proxy and xfp else scheme
    # Ask for identity: a compressed answer could not be read for usage nor relayed as labelled.
    out["accept-encoding"] = "identity"
    return out


def scope_headers(scope: Any, trusted: TrustedProxies | None = None) -> dict[str, str]:
    """`forwardable_request_headers` for an ASGI scope (its peer and scheme)."""
    client = scope.get("client")
    return forwardable_request_headers(scope["headers"], client[0] if client else None,
                                       scope.get("scheme", "http"), trusted)


def forwardable_response_headers(headers: aiohttp.typedefs.LooseHeaders) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower() not in _DROP_RESPONSE}  # type: ignore[union-attr]


@dataclass(frozen=True)
class BackendTarget:
    """Where one backend's OpenAI routes, metrics and health live, with its upstream credential."""

    name: str
    api_base: str
    metrics_url: str | None
    models_url: str
    auth_header: str | None
    kind: str = "vllm"
    health_url: str | None = None

    @classmethod
    def from_config(cls, b: BackendConfig) -> BackendTarget:
        metrics, health = b.resolved_metrics_path, b.resolved_health_path
        return cls(
            name=b.name, api_base=b.api_base, metrics_url=b.url + metrics if metrics else None,
            models_url=b.api_base + "/models",
            auth_header=f"Bearer {b.api_key}" if b.api_key else None,
            kind=b.kind, health_url=b.url + health if health else None,
        )


class Upstream:
    """Owns the pooled ClientSession (and one without pooling, for re-sending after a stale pooled
    connection was reset); created and closed by the lifespan."""

    def __init__(self, cfg: ServerConfig, resilience: ResilienceConfig | None = None,
                 client: str | None = None) -> None:
        self.cfg = cfg
        self.client = client or ("raw" if cfg.upstream_client == "raw" else "aiohttp")
        """The data path's client (`GatewayConfig.upstream_client`: `auto` resolved by the caller)."""
        self._connect_s = (resilience.timeouts.connect_s if resilience is not None and
                           resilience.timeouts.connect_s else cfg.connect_timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None
        self._pool: RawPool | None = None

    @property
    def pool(self) -> RawPool:
        """The raw client's connections (`server.upstream_client: raw`), opened with the sessions."""
        if self._pool is None:
            raise RuntimeError("upstream pool used outside the app's lifespan")
        return self._pool

    async def open(self) -> None:
        if self.client == "raw":
            self._pool = RawPool(self._connect_s, keepalive_s=60.0)
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=self.cfg.max_connections_per_backend,
            ttl_dns_cache=300, keepalive_timeout=60, enable_cleanup_closed=False,
        )
        # Deadlines are the dispatcher's (first byte, stall, total); the session only bounds connecting.
        timeout = aiohttp.ClientTimeout(total=None, connect=self._connect_s)
        self._session = aiohttp.ClientSession(
            connector=connector,
            # Identity is asked for; a backend that compresses anyway is decoded here (its
            # Content-Encoding is not relayed), so the client always gets what the headers say.
            auto_decompress=True,
            skip_auto_headers=("User-Agent",), timeout=timeout,
        )
        self._fresh = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=0),
                                            auto_decompress=True, skip_auto_headers=("User-Agent",),
                                            timeout=timeout)

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        for s in (self._session, self._fresh):
            if s is not None:
                await s.close()
        self._session = self._fresh = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("upstream session used outside the app's lifespan")
        return self._session

    @property
    def fresh(self) -> aiohttp.ClientSession:
        if self._fresh is None:
            raise RuntimeError("upstream session used outside the app's lifespan")
        return self._fresh

    async def fetch_text(self, url: str, timeout_s: float) -> tuple[int, str]:
        """GET for the scraper, the health prober and model discovery: (status, body); errors propagate."""
        async with asyncio.timeout(timeout_s):
            async with self.session.get(url) as resp:
                return resp.status, await resp.text()

    def fetcher(self, timeout_s: float) -> Callable[[str], Awaitable[tuple[int, str]]]:
        async def fetch(url: str) -> tuple[int, str]:
            return await self.fetch_text(url, timeout_s)
        return fetch
