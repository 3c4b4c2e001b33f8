"""API keys: hashing, the principal a key stands for, and the Redis store behind `gravity keys`.

Only SHA-256 hashes are ever stored or compared; a key's text is shown once, when it is created.
"""
from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from policies.config import KeyConfig, Limits, Priority, check_priority_cap

__all__ = ["KEY_PREFIX", "ApiKey", "KeyStore", "RedisKeyStore", "generate_key", "hash_key"]

KEY_PREFIX = "gk-"


def hash_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def generate_key() -> str:
    """A new key: 256 random bits, URL-safe, recognisable by its prefix in secret scanners."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class ApiKey:
    """Who a request acts as: a tenant, the models it may use, its budgets and default priority."""

    sha256: str
    name: str
    tenant: str
    models: frozenset[str] | None = None
    priority: Priority = "standard"
    limits: Limits = field(default_factory=Limits)
    created_at: float = 0.0
    source: str = "config"
    max_priority: Priority | None = None
    """Highest priority `x-gravity-priority` may ask for; None: the key's own `priority`."""
    admin: bool = False
    """May read the operator routes (`/admin/*`, `/metrics` when protected)."""
    profiles: frozenset[str] = frozenset()
    """Routing profiles `x-gravity-profile` may choose (none by default)."""

    @property
    def priority_cap(self) -> Priority | None:
        """The cap on the header's priority; None (no cap) only for the anonymous key of auth off."""
        if self.source == "anonymous":
            return None
        return self.max_priority or self.priority

    @property
    def id(self) -> str:
        """A public handle (a prefix of the hash): safe to print, log and label metrics with."""
        return self.sha256[:12]

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    def may_choose_profile(self, profile: str) -> bool:
        """Whether `x-gravity-profile` may name ``profile``; with auth off (the anonymous key) any."""
        return self.source == "anonymous" or profile in self.profiles

    @classmethod
    def from_config(cls, k: KeyConfig) -> ApiKey:
        return cls(sha256=k.sha256, name=k.name, tenant=k.tenant,
                   models=frozenset(k.models) if k.models is not None else None,
                   priority=k.priority, limits=k.limits, max_priority=k.max_priority, admin=k.admin,
                   profiles=frozenset(k.profiles))

    def to_record(self) -> bytes:
        return orjson.dumps({
            "name": self.name, "tenant": self.tenant,
            "models": sorted(self.models) if self.models is not None else None,
            "priority": self.priority, "limits": self.limits.model_dump(exclude_none=True),
            "created_at": self.created_at,
            **({"max_priority": self.max_priority} if self.max_priority is not None else {}),
            **({"admin": True} if self.admin else {}),
            **({"profiles": sorted(self.profiles)} if self.profiles else {}),
        })

    @classmethod
    def from_record(cls, sha256: str, raw: bytes) -> ApiKey:
        data: dict[str, Any] = orjson.loads(raw)
        models = data.get("models")
        profiles = data.get("profiles")
        return cls(sha256=sha256, name=str(data.get("name", "")), tenant=str(data.get("tenant", "default")),
                   models=frozenset(models) if isinstance(models, list) else None,
                   priority=data.get("priority", "standard"),
                   limits=Limits.model_validate(data.get("limits") or {}),
                   created_at=float(data.get("created_at") or 0.0), source="redis",
                   max_priority=data.get("max_priority"), admin=data.get("admin") is True,
                   profiles=frozenset(p for p in profiles if isinstance(p, str)) if isinstance(profiles, list)
                   else frozenset())


class _RedisLike(Protocol):
    """The little of redis.asyncio's Redis / RedisCluster the store uses."""

    def get(self, name: Any) -> Any: ...

    def smembers(self, name: Any) -> Any: ...

    def pipeline(self, transaction: Any = ..., shard_hint: Any = ...) -> Any: ...


class KeyStore(Protocol):
    """Where keys not in config live (Redis), as the authenticator reads it."""

    async def get(self, sha256: str) -> ApiKey | None:
        """The key with this hash, or None."""

    async def signature(self) -> tuple[int, int]:
        """(version, number of keys): changes whenever keys are created or revoked."""

    async def hashes(self) -> frozenset[str]:
        """The hash of every key in the store."""


class RedisKeyStore:
    """Keys kept in Redis: one record per hash plus an index set, all under one hash tag.

    Sharing the tag `{apikeys}` puts every record in one Cluster slot, so create and revoke are
    single MULTI transactions on a cluster too (keys are few; their lookups are cached).
    """

    def __init__(self, client: _RedisLike, prefix: str = "gravity") -> None:
        self.client = client
        self._index = f"{prefix}:{{apikeys}}"
        self._version = f"{self._index}:version"
        """Bumped by every create and revoke, so a gateway can tell the index changed cheaply."""

    def _record(self, sha256: str) -> str:
        return f"{self._index}:{sha256}"

    async def get(self, sha256: str) -> ApiKey | None:
        raw = await self.client.get(self._record(sha256))
        return ApiKey.from_record(sha256, raw) if raw is not None else None

    async def create(self, *, name: str, tenant: str, models: Iterable[str] | None = None,
                     priority: Priority = "standard", limits: Limits | None = None,
                     now: float | None = None, max_priority: Priority | None = None,
                     admin: bool = False, profiles: Iterable[str] = ()) -> tuple[str, ApiKey]:
        """Store a new key and return its text (shown once; only the hash is kept) and record."""
        check_priority_cap(priority, max_priority)
        text = generate_key()
        key = ApiKey(sha256=hash_key(text), name=name, tenant=tenant,
                     models=frozenset(models) if models is not None else None, priority=priority,
                     limits=limits or Limits(), created_at=time.time() if now is None else now,
                     source="redis", max_priority=max_priority, admin=admin, profiles=frozenset(profiles))
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self._record(key.sha256), key.to_record())
            pipe.sadd(self._index, key.sha256)
            pipe.incr(self._version)
            await pipe.execute()
        return text, key

    async def signature(self) -> tuple[int, int]:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.get(self._version)
            pipe.scard(self._index)
            version, count = await pipe.execute()
        return int(version or 0), int(count)

    async def hashes(self) -> frozenset[str]:
        return frozenset(h.decode() if isinstance(h, bytes) else str(h)
                         for h in await self.client.smembers(self._index))

    async def all(self) -> list[ApiKey]:
        hashes = sorted(h.decode() if isinstance(h, bytes) else str(h)
                        for h in await self.client.smembers(self._index))
        out = []
        for h in hashes:
            key = await self.get(h)
            if key is not None:
                out.append(key)
        return out

    async def revoke(self, id_or_name: str) -> list[ApiKey]:
        """Delete every key whose id (hash prefix, at least 8 digits) or name matches; returns them."""
        wanted = id_or_name.lower()
        gone = [k for k in await self.all()
                if (len(wanted) >= 8 and k.sha256.startswith(wanted)) or k.name == id_or_name]
        if gone:
            async with self.client.pipeline(transaction=True) as pipe:
                for k in gone:
                    pipe.delete(self._record(k.sha256))
                    pipe.srem(self._index, k.sha256)
                pipe.incr(self._version)
                await pipe.execute()
        return gone
