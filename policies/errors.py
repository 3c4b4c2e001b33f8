"""Domain errors of the admission policies, each carrying its HTTP status and OpenAI type/code.

The gateway's one error mapping (`gateway/errors.py`) reads these attributes; nothing here builds a response.
"""
from __future__ import annotations

__all__ = [
    "AdminRequired",
    "InvalidApiKey",
    "InvalidPriority",
    "KeyStoreUnavailable",
    "LimiterUnavailable",
    "LoadShed",
    "ModelNotAllowed",
    "PolicyError",
    "ProfileNotAllowed",
    "RateLimited",
]


class PolicyError(Exception):
    """Base of every admission refusal; `code` is stable and doubles as a metric label."""

    http_status = 400
    error_type = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    retry_after: float | None = None

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.headers: dict[str, str] = dict(headers or {})


class InvalidApiKey(PolicyError):
    http_status, error_type, code = 401, "invalid_request_error", "invalid_api_key"


class AdminRequired(PolicyError):
    """An operator route asked with a key that is not marked `admin: true`."""

    http_status, error_type, code = 403, "permission_error", "admin_required"


class ModelNotAllowed(PolicyError):
    """The key may not use the model: 403, or 404 `model_not_found` when the model must stay hidden."""

    http_status, error_type, code = 403, "permission_error", "model_not_allowed"
    param = "model"

    def __init__(self, model: str, *, hidden: bool) -> None:
        if hidden:
            super().__init__(f"The model '{model}' does not exist or you do not have access to it.")
            self.http_status, self.error_type, self.code = 404, "invalid_request_error", "model_not_found"
        else:
            super().__init__(f"This API key is not allowed to use the model '{model}'.")
        self.model = model


class ProfileNotAllowed(PolicyError):
    """`x-gravity-profile` named a routing profile outside the key's `profiles:` list."""

    http_status, error_type, code = 403, "permission_error", "profile_not_allowed"
    param = "x-gravity-profile"

    def __init__(self, profile: str) -> None:
        super().__init__(f"This API key may not choose the routing profile '{profile}' "
                         "(x-gravity-profile); its `profiles:` list does not include it.")
        self.profile = profile


class InvalidPriority(PolicyError):
    http_status, error_type, code = 400, "invalid_request_error", "invalid_priority"
    param = "x-gravity-priority"


class RateLimited(PolicyError):
    """A budget is spent; `retry_after` says when the request would fit (OpenAI's 429 shape)."""

    http_status, code = 429, "rate_limit_exceeded"

    def __init__(self, message: str, *, kind: str, retry_after: float,
                 headers: dict[str, str] | None = None, scope: str | None = None, limit: str = "") -> None:
        super().__init__(message, headers=headers)
        # OpenAI reports which budget ran out in `type`: "tokens" or "requests".
        self.error_type = kind
        self.retry_after = retry_after
        self.scope = scope
        """The label of the scope that refused (key, tenant, tenant model), for traces."""
        self.limit = limit
        """Which of its limits ran out: "tpm", "rpm", "tpd" or "concurrency" (a metric label)."""


class LoadShed(PolicyError):
    """Every eligible endpoint is saturated and the request may be shed (priority `sheddable`)."""

    http_status, error_type, code = 429, "requests", "load_shed"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LimiterUnavailable(PolicyError):
    """Redis is unreachable and the limiter is configured to fail closed."""

    http_status, error_type, code = 503, "server_error", "rate_limiter_unavailable"
    retry_after = 1.0


class KeyStoreUnavailable(PolicyError):
    """The key is not in config and Redis, which might hold it, cannot be reached."""

    http_status, error_type, code = 503, "server_error", "key_store_unavailable"
    retry_after = 1.0
