"""Gravity's admission policies: API keys and tenants, token rate limits, priority and shedding.

Policies return decisions or raise `PolicyError`s; the gateway turns those into HTTP responses.
"""
from __future__ import annotations

from policies.auth import Authenticator, bearer_token
from policies.bucket import MemoryState, Scope, Verdict
from policies.config import (
    AuthConfig,
    KeyConfig,
    Limits,
    PoliciesConfig,
    Priority,
    PriorityConfig,
    RateLimitConfig,
    TenantConfig,
)
from policies.errors import (
    InvalidApiKey,
    InvalidPriority,
    KeyStoreUnavailable,
    LimiterUnavailable,
    LoadShed,
    ModelNotAllowed,
    PolicyError,
    RateLimited,
)
from policies.estimate import TokenEstimator
from policies.keys import ApiKey, RedisKeyStore, generate_key, hash_key
from policies.limiter import Limiter, Reservation, ratelimit_headers
from policies.priority import resolve_priority, should_shed

__all__ = [
    "ApiKey",
    "AuthConfig",
    "Authenticator",
    "InvalidApiKey",
    "InvalidPriority",
    "KeyConfig",
    "KeyStoreUnavailable",
    "Limiter",
    "LimiterUnavailable",
    "Limits",
    "LoadShed",
    "MemoryState",
    "ModelNotAllowed",
    "PoliciesConfig",
    "PolicyError",
    "Priority",
    "PriorityConfig",
    "RateLimitConfig",
    "RateLimited",
    "RedisKeyStore",
    "Reservation",
    "Scope",
    "TenantConfig",
    "TokenEstimator",
    "Verdict",
    "bearer_token",
    "generate_key",
    "hash_key",
    "ratelimit_headers",
    "resolve_priority",
    "should_shed",
]
