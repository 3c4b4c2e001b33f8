"""Domain errors raised by the routing layer.

Each error carries a canonical ``code`` that doubles as a metric label; the gateway maps them to HTTP.
"""
from __future__ import annotations

__all__ = ["ModelNotServed", "NoHealthyEndpoint", "RoutingError", "UnknownProfile"]


class RoutingError(Exception):
    """Base of every routing failure; ``code`` is stable and safe to use as a metric label."""

    code: str = "routing_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class ModelNotServed(RoutingError):
    """No configured endpoint, healthy or not, serves the requested model (an HTTP 404 upstream)."""

    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"no endpoint serves model '{model}'")
        self.model = model


class NoHealthyEndpoint(RoutingError):
    """Endpoints serve the model but none passed the filters (an HTTP 503 upstream)."""

    code = "no_healthy_endpoint"

    def __init__(self, model: str, reason: str = "") -> None:
        detail = f": {reason}" if reason else ""
        super().__init__(f"no eligible endpoint for model '{model}'{detail}")
        self.model = model
        self.reason = reason


class UnknownProfile(RoutingError):
    """A request asked for a scheduling profile the configuration does not define."""

    code = "unknown_profile"

    def __init__(self, profile: str) -> None:
        super().__init__(f"unknown routing profile '{profile}'")
        self.profile = profile
