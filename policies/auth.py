"""Who is calling: resolve a request's API key (config first, then Redis, cached) to an `ApiKey`.

With auth off every request acts as one anonymous key of the default tenant.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

from policies.config import AuthConfig
from policies.errors import InvalidApiKey, KeyStoreUnavailable, ModelNotAllowed
from policies.keys import ApiKey, KeyStore, hash_key

__all__ = ["Authenticator", "bearer_token"]

log = logging.getLogger("gravity.policies.auth")

_INDEX_TTL_S = 1.0
"""How long the store's index is trusted to say a key does not exist: a new key works this soon."""
_INDEX_MAX_AGE_S = 60.0
"""The index is reloaded in full at least this often, even if its signature did not change (an
older `gravity keys` changes the set without bumping its version)."""
_NEGATIVE_TTL_S = 1.0  # a key in the index whose record is gone (revoked meanwhile)
_CACHE_SIZE = 10_000


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The key from `Authorization: Bearer ...`, or the `api-key` / `x-api-key` header (Azure style)."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return headers.get("api-key") or headers.get("x-api-key") or None


class Authenticator:
    def __init__(self, cfg: AuthConfig, store: KeyStore | None = None, *,
                 clock: Callable[[], float] = time.monotonic, timeout_s: float = 0.5) -> None:
        self.cfg = cfg
        self.store = store if cfg.redis_keys else None
        self.clock = clock
        self.timeout_s = timeout_s
        self.anonymous = ApiKey(sha256="", name="anonymous", tenant=cfg.default_tenant, source="anonymous")
        self._config_keys = {k.sha256: ApiKey.from_config(k) for k in cfg.keys}
        self._cache: OrderedDict[str, tuple[ApiKey | None, float]] = OrderedDict()
        # The store's set of key hashes: a key not in it is refused without a lookup or a cache
        # entry, so a flood of random keys costs Redis one index check a second and evicts nothing.
        self._known: frozenset[str] | None = None
        """None: the index could not be read at the last check (the store is unreachable)."""
        self._known_sig: tuple[int, int] | None = None
        self._known_checked = -math.inf
        self._known_loaded = -math.inf
        self._index_lock = asyncio.Lock()

    async def authenticate(self, headers: Mapping[str, str]) -> ApiKey:
        if not self.cfg.enabled:
            return self.anonymous
        token = bearer_token(headers)
        if not token:
            raise InvalidApiKey("You didn't provide an API key. Provide it in the Authorization header "
                                "(Authorization: Bearer YOUR_KEY).")
        digest = hash_key(token)
        key = self._config_keys.get(digest)
        if key is None and self.store is not None:
            key = await self._from_store(digest)
        # The dict lookup above is by hash; compare once more in constant time for good measure.
        if key is None or not hmac.compare_digest(key.sha256, digest):
            raise InvalidApiKey("Incorrect API key provided.")
        return key

    def check_model(self, key: ApiKey, model: str) -> None:
        if not key.may_use(model):
            raise ModelNotAllowed(model, hidden=self.cfg.hide_forbidden_models)

    async def _from_store(self, digest: str) -> ApiKey | None:
        assert self.store is not None
        now = self.clock()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        known = await self._index(now)
        if known is None:  # the store is unreachable: a key seen before keeps working
            if cached is not None and cached[0] is not None:
                return cached[0]
            raise KeyStoreUnavailable("The API key store is unavailable; try again shortly.")
        if digest not in known:
            self._cache.pop(digest, None)  # revoked: gone from the index
            return None
        try:
            async with asyncio.timeout(self.timeout_s):
                key = await self.store.get(digest)
        except Exception as exc:
            if cached is not None and cached[0] is not None:
                return cached[0]
            log.warning("API key store unreachable: %s", type(exc).__name__)
            raise KeyStoreUnavailable("The API key store is unavailable; try again shortly.") from exc
        ttl = self.cfg.cache_ttl_s if key is not None else min(self.cfg.cache_ttl_s, _NEGATIVE_TTL_S)
        self._cache[digest] = (key, now + ttl)
        self._cache.move_to_end(digest)
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return key

    async def _index(self, now: float) -> frozenset[str] | None:
        if now - self._known_checked < _INDEX_TTL_S:
            return self._known
        async with self._index_lock:  # one check at a time; the others then find it fresh
            now = self.clock()
            if now - self._known_checked >= _INDEX_TTL_S:
                await self._refresh_index(now)
        return self._known

    async def _refresh_index(self, now: float) -> None:
        assert self.store is not None
        try:
            async with asyncio.timeout(self.timeout_s):
                sig = await self.store.signature()
                if sig != self._known_sig or self._known is None or now - self._known_loaded >= _INDEX_MAX_AGE_S:
                    self._known = await self.store.hashes()
                    self._known_sig, self._known_loaded = sig, now
        except Exception as exc:  # noqa: BLE001 - unreachable: known keys keep working, others get 503
            if self._known is not None:
                log.warning("API key store unreachable: %s", type(exc).__name__)
            self._known = None
        self._known_checked = now
