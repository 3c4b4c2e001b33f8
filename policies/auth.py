"""Who is calling: resolve a request's API key (config first, then Redis, cached) to an `ApiKey`.

With auth off every request acts as one anonymous key of the default tenant.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

from policies.config import AuthConfig
from policies.errors import InvalidApiKey, KeyStoreUnavailable, ModelNotAllowed
from policies.keys import ApiKey, RedisKeyStore, hash_key

__all__ = ["Authenticator", "bearer_token"]

log = logging.getLogger("gravity.policies.auth")

_NEGATIVE_TTL_S = 1.0  # a key created a moment ago must work soon; unknown keys must not hammer Redis
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
    def __init__(self, cfg: AuthConfig, store: RedisKeyStore | None = None, *,
                 clock: Callable[[], float] = time.monotonic, timeout_s: float = 0.5) -> None:
        self.cfg = cfg
        self.store = store if cfg.redis_keys else None
        self.clock = clock
        self.timeout_s = timeout_s
        self.anonymous = ApiKey(sha256="", name="anonymous", tenant=cfg.default_tenant, source="anonymous")
        self._config_keys = {k.sha256: ApiKey.from_config(k) for k in cfg.keys}
        self._cache: OrderedDict[str, tuple[ApiKey | None, float]] = OrderedDict()

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
