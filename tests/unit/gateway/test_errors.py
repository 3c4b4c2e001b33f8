from __future__ import annotations

import orjson
import pytest

from gateway.errors import (
    GatewayError,
    InvalidRequest,
    error_response,
    normalise_upstream_error,
    to_gateway_error,
)
from routing.errors import ModelNotServed, NoHealthyEndpoint


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
])
def test_domain_errors_map_once(exc: Exception, status: int, code: str | None) -> None:
    err = to_gateway_error(exc)
    assert (err.status, err.code) == (status, code)
    assert "secret detail" not in err.message


def test_policy_errors_carry_their_status() -> None:
    class RateLimited(Exception):
        http_status = 429
        error_type = "requests"
        code = "rate_limit_exceeded"
        retry_after = 2.5
        headers = {"x-ratelimit-remaining-tokens": "0"}

    resp = error_response(RateLimited("slow down"))
    assert resp.status_code == 429
    assert resp.headers["retry-after"] == "3"
    assert resp.headers["x-ratelimit-remaining-tokens"] == "0"
    assert _body(resp)["code"] == "rate_limit_exceeded"


@pytest.mark.parametrize(("status", "body", "message", "code"), [
    (400, b'{"object":"error","message":"bad temp","type":"BadRequestError","param":null,"code":400}',
     "bad temp", None),
    (404, b'{"error":{"message":"The model `x` does not exist.","type":"NotFoundError","code":404}}',
     "The model `x` does not exist.", "model_not_found"),
    (422, b'{"detail":"field required"}', "field required", None),
    (500, b"Internal Server Error", "Internal Server Error", None),
    (502, b"", "Backend returned HTTP 502.", None),
])
def test_upstream_errors_are_normalised(status: int, body: bytes, message: str, code: str | None) -> None:
    err = normalise_upstream_error(status, body)
    assert (err.status, err.message, err.code) == (status, message, code)
    assert err.type == ("server_error" if status >= 500 else err.type)
