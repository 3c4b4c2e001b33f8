"""The one place where errors become OpenAI-shaped HTTP responses.

Lower layers raise domain errors (routing, policies); `to_gateway_error` translates them here.
"""
from __future__ import annotations

import math
from typing import Any

import orjson
from starlette.responses import Response

from routing.errors import ModelNotServed, NoHealthyEndpoint, RoutingError, UnknownProfile


class GatewayError(Exception):
    """An error with everything a client needs: status, OpenAI `type`/`code`/`param`, headers."""

    status = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None, type: str | None = None,
                 retry_after: float | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.retry_after = retry_after
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(GatewayError):
    status, type, code = 400, "invalid_request_error", None


class NotFound(GatewayError):
    status, type, code = 404, "invalid_request_error", "not_found"


class ModelNotFound(GatewayError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class MethodNotAllowed(GatewayError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"


class Conflict(GatewayError):
    """The target is busy or changed under the request (e.g. a conversation another response holds)."""

    status, type, code = 409, "invalid_request_error", "conflict"


class RequestTimeout(GatewayError):
    status, type, code = 408, "invalid_request_error", "request_timeout"


class BodyTooLarge(GatewayError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class ServiceUnavailable(GatewayError):
    status, type, code = 503, "server_error", "service_unavailable"


class BadGateway(GatewayError):
    status, type, code = 502, "server_error", "bad_gateway"


class UpstreamTimeout(GatewayError):
    status, type, code = 504, "server_error", "upstream_timeout"


class UpstreamError(GatewayError):
    """A backend's own error response, normalised to the OpenAI shape with its status kept."""

    code = None


def is_expected(exc: BaseException) -> bool:
    """A domain outcome (bad input, a refusal, an outage) rather than a bug: no traceback for these."""
    return isinstance(exc, (GatewayError, RoutingError)) or isinstance(getattr(exc, "http_status", None), int)


def to_gateway_error(exc: BaseException) -> GatewayError:
    """Translate any error raised while serving a request; unknown ones become a bare 500."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, ModelNotServed):
        return ModelNotFound(f"The model '{exc.model}' does not exist or is not served here.", param="model")
    if isinstance(exc, NoHealthyEndpoint):
        return ServiceUnavailable(f"No healthy backend is available for model '{exc.model}'.",
                                  code="no_healthy_backend", retry_after=1)
    if isinstance(exc, UnknownProfile):  # only a request can name one: config names are checked at start-up
        return InvalidRequest(f"Unknown routing profile '{exc.profile}'.", param="x-gravity-profile",
                              code="unknown_profile")
    if isinstance(exc, RoutingError):
        return ServiceUnavailable(str(exc), code=getattr(exc, "code", "routing_error"), retry_after=1)
    # Policy errors carry their own status and OpenAI code (policies never build responses).
    status = getattr(exc, "http_status", None)
    if isinstance(status, int):
        return GatewayError(str(exc), status=status, type=getattr(exc, "error_type", "invalid_request_error"),
                            code=getattr(exc, "code", None), param=getattr(exc, "param", None),
                            retry_after=getattr(exc, "retry_after", None),
                            headers=getattr(exc, "headers", None))
    return GatewayError("The gateway failed to handle the request.")


def error_response(exc: BaseException, headers: dict[str, str] | None = None) -> Response:
    err = to_gateway_error(exc)
    out = {**err.headers, **(headers or {})}
    if err.retry_after is not None:
        out["retry-after"] = str(max(1, math.ceil(err.retry_after)))
    return Response(orjson.dumps(err.body()), status_code=err.status, headers=out,
                    media_type="application/json")


class UpstreamAuthError(GatewayError):
    """The backend refused the gateway's own credential: an operator's problem, never the client's key."""

    status, type, code = 502, "server_error", "upstream_auth_error"


def _openai_type(status: int) -> str:
    """OpenAI's `type` for a status: backends' own strings (BadRequestError, NotFoundError...) are theirs."""
    if status == 429:
        return "requests"
    return "invalid_request_error" if status < 500 else "server_error"


def normalise_upstream_error(status: int, body: bytes, retry_after: str | None = None) -> GatewayError:
    """Rewrite a backend's error body (vLLM's several shapes, KServe's, plain text) as OpenAI's.

    The status is kept except for 401/403, which say the *gateway's* upstream key is wrong (a 502);
    a backend's `Retry-After` (whole seconds) is passed on."""
    if status in (401, 403):
        return UpstreamAuthError(f"The backend refused the gateway's credentials (HTTP {status}); "
                                 "the operator has been told.")
    message, etype, param, code = "", _openai_type(status), None, None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        nested = data.get("error")
        inner: dict[str, Any] = nested if isinstance(nested, dict) else data
        message = str(inner.get("message") or inner.get("detail") or inner.get("error") or "")
        param = inner.get("param") if isinstance(inner.get("param"), str) else None
        raw_code = inner.get("code")
        code = raw_code if isinstance(raw_code, str) else None
    if not message:
        message = body[:500].decode("utf-8", "replace").strip() or f"Backend returned HTTP {status}."
    if status == 404 and code is None and "model" in message.lower():
        code = "model_not_found"
    if status == 429 and code is None:
        code = "rate_limit_exceeded"
    wait = float(retry_after) if retry_after is not None and retry_after.strip().isdigit() else None
    return UpstreamError(message[:2000], status=status, type=etype, param=param, code=code, retry_after=wait)
