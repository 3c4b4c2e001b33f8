"""The ``policies:`` section of Gravity's configuration: API keys, tenants, token limits, priority.

Validated pydantic value objects (``extra="forbid"``); the gateway embeds `PoliciesConfig` in its own model.
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "AuthConfig",
    "KeyConfig",
    "Limits",
    "PoliciesConfig",
    "Priority",
    "PriorityConfig",
    "RateLimitConfig",
    "TenantConfig",
]

Priority = Literal["critical", "standard", "sheddable"]
PRIORITY_RANK: dict[Priority, int] = {"sheddable": 0, "standard": 1, "critical": 2}


def check_priority_cap(priority: Priority, max_priority: Priority | None) -> None:
    if max_priority is not None and PRIORITY_RANK[priority] > PRIORITY_RANK[max_priority]:
        raise ValueError(f"priority {priority!r} is above max_priority {max_priority!r}")

# Tenant names end up inside Redis hash tags `{tenant}`: no braces, no spaces.
_NAME = r"^[A-Za-z0-9._-]{1,64}$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Model):
    """Budgets of one scope (a key, a tenant, or a tenant's use of one model); omit a field for no limit."""

    tpm: int | None = Field(default=None, ge=1)
    """Tokens per minute (prompt + completion), a token bucket refilled continuously."""
    rpm: int | None = Field(default=None, ge=1)
    """Requests per minute, a token bucket of requests."""
    tpd: int | None = Field(default=None, ge=1)
    """Tokens per day, a bucket refilled continuously over 24 hours (a rolling day, not a calendar day)."""
    concurrency: int | None = Field(default=None, ge=1)
    """Requests in flight at once, across every gateway replica sharing the Redis."""

    def is_empty(self) -> bool:
        return self.tpm is None and self.rpm is None and self.tpd is None and self.concurrency is None


class KeyConfig(_Model):
    """An API key known from config, by the SHA-256 of its text only (`gravity keys hash` prints it)."""

    name: str = Field(min_length=1, max_length=128)
    """A label for listings, metrics and logs (the key itself is never logged)."""
    sha256: str
    """Lower-case hex SHA-256 of the key's full text."""
    tenant: str = Field(default="default", pattern=_NAME)
    models: list[str] | None = None
    """Models the key may use; omit for every model."""
    priority: Priority = "standard"
    """Priority of the key's requests when they carry no `x-gravity-priority` header."""
    max_priority: Priority | None = None
    """Highest priority the header may ask for (a higher one is lowered to it); default: `priority`."""
    limits: Limits = Limits()
    admin: bool = False
    """May read the operator routes (`/admin/*`, and `/metrics` with `server.metrics_auth: admin`)."""
    profiles: list[str] = Field(default_factory=list)
    """Routing profiles the `x-gravity-profile` header may choose; none by default (the header gets a 403)."""

    @model_validator(mode="after")
    def _priority_within_max(self) -> KeyConfig:
        check_priority_cap(self.priority, self.max_priority)
        return self

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        v = v.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", v):
            raise ValueError("must be the 64 hex digits of a SHA-256 (never the key itself)")
        return v


class TenantConfig(_Model):
    """Budgets shared by every key of a tenant, and per model the tenant uses."""

    limits: Limits = Limits()
    models: dict[str, Limits] = Field(default_factory=dict)
    """Per (tenant, model) budgets, by model name."""


class AuthConfig(_Model):
    enabled: bool = False
    """Off (the development default): no key needed, every request belongs to `default_tenant`."""
    default_tenant: str = Field(default="default", pattern=_NAME)
    keys: list[KeyConfig] = Field(default_factory=list)
    redis_keys: bool = True
    """Also accept keys created with `gravity keys create` (kept in Redis)."""
    cache_ttl_s: float = Field(default=10.0, ge=0)
    """How long a key read from Redis is trusted before it is read again (a revocation's delay)."""
    hide_forbidden_models: bool = False
    """Answer a model the key may not use with 404 `model_not_found` instead of 403."""


class RateLimitConfig(_Model):
    enabled: bool = True
    """Enforce the configured limits (none are configured by default, so nothing is limited)."""
    failure_mode: Literal["open", "closed"] = "open"
    """Redis unreachable: `open` falls back to a per-replica local limiter, `closed` answers 503."""
    local_share: float = Field(default=1.0, gt=0, le=1)
    """Fraction of each limit one replica enforces on its own while Redis is unreachable
    (1 / replicas keeps the fleet within the limit; 1.0 lets each replica spend the whole limit)."""
    redis_timeout_s: float = Field(default=0.25, gt=0)
    """Longest wait for one limiter call before Redis counts as unreachable."""
    redis_retry_s: float = Field(default=1.0, ge=0)
    """After a Redis failure, use the local limiter this long before trying Redis again."""
    default_max_tokens: int = Field(default=1024, ge=0)
    """Completion tokens reserved for a request that sets no `max_tokens`."""
    settle_interval_ms: float = Field(default=5.0, ge=0, le=1000)
    """Settlements (refunds, debts, slot releases) are queued and sent to Redis in one script call
    per tenant this often, off the request path; 0 settles each request on its own as it ends.
    Budgets see a settlement at most this much (plus one Redis round trip) late."""
    concurrency_lease_s: float = Field(default=900.0, gt=0)
    """A concurrency slot is freed after this long even if its gateway died before releasing it."""
    estimator: Literal["auto", "tiktoken", "bytes"] = "auto"
    """Prompt token estimate: tiktoken o200k_base, bytes (ratio learnt from usage), or auto
    (tiktoken up to `tiktoken_max_bytes` of prompt, bytes above; see docs/policies.md)."""
    tiktoken_max_bytes: int = Field(default=1024, ge=0)
    """Largest prompt counted with tiktoken in `auto` mode (~37 µs at 1 KiB; see docs/policies.md)."""
    key_prefix: str = Field(default="gravity:rl", pattern=r"^[A-Za-z0-9:._-]+$")


_VLLM_PRIORITY: dict[Priority, int] = {"critical": -10, "standard": 0, "sheddable": 10}


class PriorityConfig(_Model):
    shed: bool = True
    """Refuse `sheddable` requests at once when every eligible endpoint is saturated."""
    shed_waiting_threshold: int = Field(default=8, ge=1)
    """An endpoint whose scraped queue (`num_requests_waiting`) is at least this is saturated."""
    shed_inflight_threshold: int | None = Field(default=None, ge=1)
    """Also saturated when the gateway's own in-flight count to it reaches this (for stale metrics)."""
    shed_retry_after_s: float = Field(default=1.0, gt=0)
    upstream: bool = False
    """Send `priority` in the upstream body (vLLM started with `--scheduling-policy priority`)."""
    upstream_values: dict[Priority, int] = Field(default_factory=lambda: dict(_VLLM_PRIORITY))
    """vLLM serves lower values first."""

    @field_validator("upstream_values")
    @classmethod
    def _all_levels(cls, v: dict[str, int]) -> dict[str, int]:
        missing = {"critical", "standard", "sheddable"} - set(v)
        if missing:
            raise ValueError(f"missing values for {sorted(missing)}")
        return v


class PoliciesConfig(_Model):
    auth: AuthConfig = AuthConfig()
    tenants: dict[str, TenantConfig] = Field(default_factory=dict)
    """Tenant budgets by tenant name (`default` applies when auth is off)."""
    rate_limits: RateLimitConfig = RateLimitConfig()
    priority: PriorityConfig = PriorityConfig()

    @field_validator("tenants")
    @classmethod
    def _tenant_names(cls, v: dict[str, TenantConfig]) -> dict[str, TenantConfig]:
        for name in v:
            if not re.fullmatch(_NAME, name):
                raise ValueError(f"tenant name {name!r} must match {_NAME}")
        return v

    @model_validator(mode="after")
    def _unique_keys(self) -> PoliciesConfig:
        seen: dict[str, int] = {}
        for i, k in enumerate(self.auth.keys):
            if k.sha256 in seen:
                raise ValueError(f"auth.keys[{i}].sha256: same key as auth.keys[{seen[k.sha256]}]")
            seen[k.sha256] = i
        return self
