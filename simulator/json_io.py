"""JSON in and out for the simulator's routes: one body parser and one error shape (vLLM's)."""
from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from simulator.openai_api import ApiError


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


async def json_body(request: Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"Invalid JSON body: {exc}") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    headers = {"retry-after": "1"} if exc.status in (429, 503) else {}
    if rid := request.headers.get("x-request-id"):
        headers["x-request-id"] = rid
    return json_response(exc.body(), exc.status, headers)
