"""Upstream I/O behind one method: `Transport.send(request) -> UpstreamResponse`.

The dispatcher sees only this protocol, so its retry matrix is unit-tested with a scripted
transport (tests/unit/gateway/test_dispatcher.py) and production uses aiohttp (one pooled session,
docs/decisions/0001-aiohttp.md). Failures are raised as the few kinds the attempt state machine
tells apart (policies/attempts.py `Failure`).
"""
from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp

__all__ = [
    "AiohttpTransport",
    "ConnectFailed",
    "ConnectTimedOut",
    "StreamBroken",
    "Transport",
    "TransportError",
    "UpstreamRequest",
    "UpstreamResponse",
]


class TransportError(Exception):
    """A failure to exchange bytes with a backend (never an HTTP status: those are responses)."""


class ConnectFailed(TransportError):
    """Nothing was received: refused, reset, unreachable."""

    def __init__(self, reason: str, *, refused: bool = False) -> None:
        super().__init__(reason)
        self.refused = refused
        """Nothing listens there (ECONNREFUSED): the endpoint is down, not merely slow."""


class ConnectTimedOut(TransportError):
    pass


class StreamBroken(TransportError):
    """The connection died after the response head arrived."""


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    url: str
    headers: Mapping[str, str]
    body: bytes


class UpstreamResponse(Protocol):
    status: int
    headers: Mapping[str, str]
    content_type: str

    async def read(self) -> bytes:
        """The whole body (raises StreamBroken)."""
        ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (raises StreamBroken)."""
        ...

    def release(self) -> None: ...


class Transport(Protocol):
    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        """Send and wait for the response head; the caller bounds the wait with its own deadline."""
        ...


# -- aiohttp ------------------------------------------------------------------------------------
_RESET = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
_RESET_ERRNOS = {errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED}


def _stale(exc: BaseException) -> bool:
    """A reset before any byte: the classic race with a backend closing an idle kept-alive connection."""
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return True
    return isinstance(exc, aiohttp.ClientOSError) and not isinstance(exc, aiohttp.ClientConnectorError) \
        and exc.errno in _RESET_ERRNOS


class _AiohttpResponse:
    __slots__ = ("_resp", "content_type", "headers", "status")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers: Mapping[str, str] = resp.headers
        self.content_type = resp.content_type

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except aiohttp.ClientError as exc:
            raise StreamBroken(type(exc).__name__) from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        content = self._resp.content
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    return
                yield chunk
        except aiohttp.ClientError as exc:
            raise StreamBroken(type(exc).__name__) from exc

    def release(self) -> None:
        self._resp.release()


class _Sessions(Protocol):
    """The pooled session and a non-pooling one (gateway/upstream.py's Upstream, opened in the lifespan)."""

    @property
    def session(self) -> aiohttp.ClientSession: ...

    @property
    def fresh(self) -> aiohttp.ClientSession: ...


class AiohttpTransport:
    """The production transport: one pooled session, plus a fresh connection for one re-send after a
    stale pooled one was reset (not an attempt: the backend never saw the request)."""

    def __init__(self, sessions: _Sessions) -> None:
        self._sessions = sessions
        self.stale_resends = 0

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        try:
            return await self._post(self._sessions.session, request)
        except _RESET as exc:
            if not _stale(exc):
                raise ConnectFailed(type(exc).__name__) from exc
            self.stale_resends += 1
        try:
            return await self._post(self._sessions.fresh, request)
        except _RESET as exc:
            raise ConnectFailed(type(exc).__name__) from exc

    @staticmethod
    async def _post(session: aiohttp.ClientSession, request: UpstreamRequest) -> _AiohttpResponse:
        try:
            resp = await session.post(request.url, data=request.body, headers=request.headers)
        except aiohttp.ConnectionTimeoutError as exc:
            raise ConnectTimedOut(str(exc) or "connect timeout") from exc
        except aiohttp.ClientConnectorError as exc:
            raise ConnectFailed(type(exc).__name__, refused=exc.errno == errno.ECONNREFUSED) from exc
        except TimeoutError:
            raise
        except aiohttp.ClientResponseError as exc:  # a malformed response head
            raise ConnectFailed(type(exc).__name__) from exc
        return _AiohttpResponse(resp)
