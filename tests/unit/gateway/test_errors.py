from __future__ import annotations

import orjson
import pytest

from gateway.errors import (
    GatewayError,
    InvalidRequest,
    error_response,
    is_expected,
    normalise_upstream_error,
    to_gateway_error,
)
from policies.errors import RateLimited
from routing.errors import ModelNotServed, NoHealthyEndpoint, UnknownProfile


def _body(resp: object) -> dict[str, object]:
    return orjson.loads(resp.body)["error"]  # type: ignore[attr-defined,no-any-return]


def test_shape_is_openai_and_retry_after_is_whole_seconds() -> None:
    resp = error_response(GatewayError("busy", status=503, code="x", retry_after=0.2))
    assert resp.status_code == 503
    assert resp.headers["retry-after"] == "1"
    assert set(_body(resp)) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(("exc", "status", "code"), [
    (ModelNotServed("m"), 404, "model_not_found"),
    (NoHealthyEndpoint("m"), 503, "no_healthy_backend"),
    (InvalidRequest("bad", param="messages"), 400, None),
    (RuntimeError("secret detail"), 500, "internal_error"),
    (UnknownProfile("gone"), 400, "unknown_profile"),  # only a request's header can name one
])
def test_domain_errors_map_once(exc: Exception, status: int, code: str | None) -> None:
    err = to_gateway_error(exc)
    assert (err.status, err.code) == (status, code)
    assert "secret detail" not in err.message


def test_policy_errors_carry_their_status() -> None:
    exc = RateLimited("slow down", kind="tokens", retry_after=2.5,
                      headers={"x-ratelimit-remaining-tokens": "0"})
    resp = error_response(exc)
    assert resp.status_code == 429
    assert resp.headers["retry-after"] == "3"
    assert resp.headers["x-ratelimit-remaining-tokens"] == "0"
    assert _body(resp) == {"message": "slow down", "type": "tokens", "param": None, "code": "rate_limit_exceeded"}
    assert is_expected(exc) and not is_expected(RuntimeError("bug"))


@pytest.mark.parametrize(("status", "body", "message", "type_", "code"), [
    (400, b'{"object":"error","message":"bad temp","type":"BadRequestError","param":null,"code":400}',
     "bad temp", "invalid_request_error", None),
    (404, b'{"error":{"message":"The model `x` does not exist.","type":"NotFoundError","code":404}}',
     "The model `x` does not exist.", "invalid_request_error", "model_not_found"),
    (422, b'{"detail":"field required"}', "field required", "invalid_request_error", None),
    (429, b'{"message":"queue full","type":"TooManyRequests"}', "queue full", "requests", "rate_limit_exceeded"),
    (500, b"Internal Server Error", "Internal Server Error", "server_error", None),
    (502, b"", "Backend returned HTTP 502.", "server_error", None),
    (503, b'{"error":{"message":"busy","type":"EngineDeadError","code":"engine_dead"}}', "busy", "server_error",
     "engine_dead"),
])
def test_upstream_errors_are_normalised(status: int, body: bytes, message: str, type_: str,
                                        code: str | None) -> None:
    err = normalise_upstream_error(status, body)
    assert (err.status, err.message, err.type, err.code) == (status, message, type_, code)


@pytest.mark.parametrize("status", [401, 403])
def test_upstream_auth_failures_are_the_gateways_problem(status: int) -> None:
    err = normalise_upstream_error(status, b'{"error":{"message":"Incorrect API key sk-abc","code":"invalid_api_key"}}')
    assert (err.status, err.type, err.code) == (502, "server_error", "upstream_auth_error")
    assert "sk-abc" not in err.message


def test_a_backends_retry_after_is_kept() -> None:
    resp = error_response(normalise_upstream_error(503, b"busy", "7"))
    assert resp.headers["retry-after"] == "7"
    assert "retry-after" not in error_response(normalise_upstream_error(503, b"busy", "soon")).headers
