"""Routes the sidecar answers itself: the gateway's own ASGI app, called in-process, its answer
sent back as one ImmediateResponse.

Everything that is not one of the three proxied inference routes (`/v1/models`, the Responses and
Conversations APIs from Redis, `/health`, `/ready`, `/metrics`, unknown paths' 404) gets exactly
the answer `gravity serve` gives, from the same code. A streamed Responses call is answered whole:
an ImmediateResponse has one body (docs/extproc.md).
"""
from __future__ import annotations

import asyncio
from collections.abc import Mapping, MutableMapping
from typing import Any

__all__ = ["LocalAnswer", "call_app"]

_SKIP_RESPONSE = frozenset({b"content-length", b"transfer-encoding", b"connection"})

LocalAnswer = tuple[int, list[tuple[str, str]], bytes]


async def call_app(app: Any, method: str, target: str, headers: Mapping[str, str], body: bytes) -> LocalAnswer:
    """(status, headers, body) of one request to an ASGI app, with no socket in between."""
    path, _, query = target.partition("?")
    scope: dict[str, Any] = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode("latin-1"), "root_path": "",
        "query_string": query.encode("latin-1"), "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0),
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
                    if not k.startswith(":")] + [(b"host", headers.get(":authority", "gravity").encode("latin-1"))],
    }
    delivered = False
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def receive() -> MutableMapping[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await never  # the request is whole; a disconnect never comes (the app's watchers are cancelled)
        raise AssertionError("unreachable")

    status = 500
    out_headers: list[tuple[str, str]] = []
    chunks: list[bytes] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])
            out_headers.extend((k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", ())
                               if k.lower() not in _SKIP_RESPONSE)
        elif message["type"] == "http.response.body":
            chunks.append(bytes(message.get("body", b"")))

    try:
        await app(scope, receive, send)
    finally:
        never.cancel()
    return status, out_headers, b"".join(chunks)
