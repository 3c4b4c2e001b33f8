"""Policy errors reach clients through the gateway's one mapping, OpenAI-shaped."""
from __future__ import annotations

import pytest

from gateway.errors import error_response, to_gateway_error
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


@pytest.mark.parametrize(("exc", "status", "etype", "code"), [
    (InvalidApiKey("Incorrect API key provided."), 401, "invalid_request_error", "invalid_api_key"),
    (ModelNotAllowed("m", hidden=False), 403, "permission_error", "model_not_allowed"),
    (ModelNotAllowed("m", hidden=True), 404, "invalid_request_error", "model_not_found"),
    (InvalidPriority("bad"), 400, "invalid_request_error", "invalid_priority"),
    (RateLimited("slow down", kind="tokens", retry_after=1.5), 429, "tokens", "rate_limit_exceeded"),
    (LoadShed("busy", retry_after=1), 429, "requests", "load_shed"),
    (LimiterUnavailable("down"), 503, "server_error", "rate_limiter_unavailable"),
    (KeyStoreUnavailable("down"), 503, "server_error", "key_store_unavailable"),
])
def test_each_error_maps_to_its_status_and_code(exc: PolicyError, status: int, etype: str, code: str) -> None:
    err = to_gateway_error(exc)
    assert (err.status, err.type, err.code) == (status, etype, code)
    assert err.body()["error"]["message"] == str(exc)


def test_rate_limited_carries_retry_after_and_its_headers() -> None:
    exc = RateLimited("slow down", kind="requests", retry_after=1.2,
                      headers={"x-ratelimit-remaining-requests": "0"})
    resp = error_response(exc)
    assert resp.status_code == 429
    assert resp.headers["retry-after"] == "2"
    assert resp.headers["x-ratelimit-remaining-requests"] == "0"


def test_hidden_model_names_the_model_param() -> None:
    assert to_gateway_error(ModelNotAllowed("secret", hidden=True)).param == "model"
