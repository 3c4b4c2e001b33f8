"""One ext_proc stream (one HTTP request through Envoy): read, decide, mutate, account.

Request side: headers and the whole body are read (FULL_DUPLEX_STREAMED or BUFFERED), the body is
parsed as the proxy parses it, then the decision goes back as `x-gateway-destination-endpoint`
(header and `envoy.lb` metadata) with the body to send. Response side: chunks go back as they come
(SSE events whole), while usage is read for settlement and the extra usage chunk is dropped.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import orjson

from gateway.errors import BodyTooLarge, GatewayError, normalise_upstream_error, to_gateway_error
from gateway.extproc import wire
from gateway.extproc.decider import Decider, Pick, PickRequest
from gateway.extproc.pb import ep, modes
from gateway.openai_requests import parse_body
from gateway.sse import EventSplitter, usage_of

__all__ = ["ExtProcStream"]

log = logging.getLogger("gravity.extproc")

_ROUTES = {"/v1/chat/completions": "chat/completions", "/v1/completions": "completions",
           "/v1/embeddings": "embeddings"}
_FULL_DUPLEX = ep.ProtocolConfiguration.DESCRIPTOR.fields_by_name["request_body_mode"].enum_type \
    .values_by_name["FULL_DUPLEX_STREAMED"].number
_BUFFERED = ep.ProtocolConfiguration.DESCRIPTOR.fields_by_name["request_body_mode"].enum_type \
    .values_by_name["BUFFERED"].number
_MODES = {"full_duplex_streamed": _FULL_DUPLEX, "buffered": _BUFFERED}
# Told to Envoy in the response-headers answer when the body needs no reading (`read_response`).
_SKIP_BODY = modes.ProcessingMode(response_body_mode=modes.ProcessingMode.NONE,
                                  response_trailer_mode=modes.ProcessingMode.SKIP)
_ERROR_BODY_LIMIT = 64 * 1024
_JSON_USAGE_LIMIT = 4 * 1024 * 1024


class ExtProcStream:
    """Feed each ProcessingRequest to `handle`; send what it returns in order; call `close` once."""

    def __init__(self, decider: Decider, *, max_body_bytes: int, body_mode: str = "full_duplex_streamed",
                 debug_headers: bool = False, read_response: str = "always",
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.decider = decider
        self.read_always = read_response == "always"
        self.max_body = max_body_bytes
        self.request_mode = _MODES[body_mode]
        self.response_mode = _FULL_DUPLEX
        self.debug_headers = debug_headers
        self.clock = clock
        self.headers: dict[str, str] = {}
        self.route: str | None = None
        """A proxied inference route ("chat/completions"...); None: a route the sidecar answers itself."""
        self.subset: list[str] | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.body_phase = False
        self.pick: Pick | None = None
        self.done = False
        """An ImmediateResponse went out, or the response ended: the stream has nothing more to say."""
        self._finished = False
        # response side
        self.status = 0
        self.streaming = False
        self.error_body: list[bytes] | None = None
        self.splitter: EventSplitter | None = None
        self.json_body: list[bytes] | None = None
        self.json_size = 0

    # -- dispatch ---------------------------------------------------------------------------
    async def handle(self, msg: ep.ProcessingRequest) -> list[ep.ProcessingResponse]:
        if msg.HasField("protocol_config"):
            self.request_mode = msg.protocol_config.request_body_mode or self.request_mode
            self.response_mode = msg.protocol_config.response_body_mode or self.response_mode
        kind = msg.WhichOneof("request")
        try:
            if kind == "request_headers":
                return await self._request_headers(msg)
            if kind == "request_body":
                return await self._request_body(msg.request_body.body, msg.request_body.end_of_stream)
            if kind == "request_trailers":
                out = await self._request_body(b"", True) if self.pick is None and not self.done else []
                return [*out, ep.ProcessingResponse(request_trailers=ep.TrailersResponse())]
            if kind == "response_headers":
                return await self._response_headers(msg)
            if kind == "response_body":
                return await self._response_body(msg.response_body.body, msg.response_body.end_of_stream)
            if kind == "response_trailers":
                await self._end_response()
                return [ep.ProcessingResponse(response_trailers=ep.TrailersResponse())]
        except GatewayError as err:
            return await self._reject(err)
        return []

    async def _reject(self, err: GatewayError) -> list[ep.ProcessingResponse]:
        """Answer with the error as the proxy would; the stream ends."""
        self.done = True
        if self.pick is None:
            await self.decider.reject(err, None)
        return [wire.immediate(err)]

    # -- request ----------------------------------------------------------------------------
    async def _request_headers(self, msg: ep.ProcessingRequest) -> list[ep.ProcessingResponse]:
        self.headers = wire.headers_of(msg.request_headers)
        self.subset = wire.subset_hint(msg.metadata_context)
        method = self.headers.get(":method", "")
        path = self.headers.get(":path", "").split("?", 1)[0]
        self.route = _ROUTES.get(path) if method == "POST" else None
        length = self.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            raise BodyTooLarge(f"Request body of {length} bytes exceeds the limit of {self.max_body} bytes.")
        if msg.request_headers.end_of_stream:
            return await self._decide()
        if self.request_mode == _FULL_DUPLEX:
            return []  # the headers answer carries the decision, once the body is complete
        return [ep.ProcessingResponse(request_headers=ep.HeadersResponse())]

    async def _answer_locally(self, raw: bytes) -> list[ep.ProcessingResponse]:
        """Not an inference route: the gateway's own app answers (models, Responses, 404s...)."""
        self.done = True
        status, headers, body = await self.decider.local(self.headers.get(":method", ""),
                                                         self.headers.get(":path", "/"), self.headers, raw)
        return [ep.ProcessingResponse(immediate_response=ep.ImmediateResponse(
            status={"code": status}, headers=wire.header_list_mutation(headers), body=body,
            details="gravity_local"))]

    async def _request_body(self, chunk: bytes, end: bool) -> list[ep.ProcessingResponse]:
        if self.done or self.pick is not None:
            return []
        self.body_phase = True
        self.size += len(chunk)
        if self.size > self.max_body:
            raise BodyTooLarge(f"Request body exceeds the limit of {self.max_body} bytes.")
        if chunk:
            self.chunks.append(chunk)
        if not end:
            return []
        return await self._decide()

    async def _decide(self) -> list[ep.ProcessingResponse]:
        raw = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks = []
        if self.route is None:
            return await self._answer_locally(raw)
        parsed = parse_body(self.route, raw)  # the proxy's parser: the same 400s
        try:
            pick = await self.decider.decide(PickRequest(self.route, parsed, raw, self.headers, self.subset))
        except Exception as exc:  # noqa: BLE001 - the decider accounted for it; answer it
            self.done = True
            return [wire.immediate(to_gateway_error(exc))]
        self.pick = pick
        set_headers = {wire.DESTINATION: ",".join(pick.addresses), **pick.set_headers}
        if pick.body is not raw and pick.body != raw:
            set_headers["content-length"] = str(len(pick.body))
        mutation = wire.header_mutation(set_headers, pick.remove_headers)
        metadata = wire.destination_metadata(pick.addresses, pick.scores)
        if self.request_mode == _FULL_DUPLEX:
            head = ep.ProcessingResponse(
                request_headers=ep.HeadersResponse(response=ep.CommonResponse(
                    header_mutation=mutation, clear_route_cache=True)),
                dynamic_metadata=metadata)
            bodies = [ep.ProcessingResponse(request_body=ep.BodyResponse(response=ep.CommonResponse(
                body_mutation=ep.BodyMutation(streamed_response=part))))
                for part in wire.body_chunks(pick.body, True)] if self.body_phase else []
            return [head, *bodies]
        common = ep.CommonResponse(header_mutation=mutation, clear_route_cache=True)
        if pick.body != raw:
            common.body_mutation.body = pick.body
        if not self.body_phase:
            # No body phase (headers ended the stream): the decision rides on the headers answer.
            return [ep.ProcessingResponse(request_headers=ep.HeadersResponse(response=common),
                                          dynamic_metadata=metadata)]
        return [ep.ProcessingResponse(request_body=ep.BodyResponse(response=common), dynamic_metadata=metadata)]

    # -- response ---------------------------------------------------------------------------
    async def _response_headers(self, msg: ep.ProcessingRequest) -> list[ep.ProcessingResponse]:
        pick = self.pick
        headers = wire.headers_of(msg.response_headers)
        status = headers.get(":status", "0")
        self.status = int(status) if status.isdigit() else 0
        set_headers: dict[str, str] = {}
        remove: list[str] = []
        skip = False
        if pick is not None:
            ex = pick.exchange
            ex.status = self.status
            await self.decider.served(pick, wire.served_endpoint(msg))
            set_headers.update(ex.response_headers)
            set_headers["x-request-id"] = pick.echo_request_id
            if self.debug_headers and ex.backend:
                set_headers["x-gravity-backend"] = ex.backend
                if ex.decision is not None:
                    set_headers["x-gravity-route"] = ex.decision.header()
            content_type = headers.get("content-type", "")
            if self.status >= 400:
                # Upstream (or Envoy's own) errors are rewritten to the OpenAI shape, as the proxy does.
                self.error_body = []
                set_headers["content-type"] = "application/json"
                remove.append("content-length")
            elif ex.stream and content_type.startswith("text/event-stream"):
                self.streaming = True
                self.splitter = EventSplitter()
                if not ex.client_wants_usage:
                    remove.append("content-length")
            elif self.read_always or pick.settles or ex.stream or self.response_mode == _FULL_DUPLEX:
                # (In full duplex Envoy streams the body on regardless of an override, and the
                # processor must send it back.)
                self.json_body = []
            else:
                # Nothing waits for this answer's usage: Envoy passes the body on by itself.
                skip = True
        if skip or msg.response_headers.end_of_stream:
            await self._end_response()
        answer = ep.ProcessingResponse(response_headers=ep.HeadersResponse(response=ep.CommonResponse(
            header_mutation=wire.header_mutation(set_headers, remove))))
        if skip:
            answer.mode_override.CopyFrom(_SKIP_BODY)
        return [answer]

    async def _response_body(self, chunk: bytes, end: bool) -> list[ep.ProcessingResponse]:
        out = self._relay(chunk, end)
        if end:
            await self._end_response()
        return out

    def _relay(self, chunk: bytes, end: bool) -> list[ep.ProcessingResponse]:
        pick = self.pick
        if pick is None:
            return self._body_answer(chunk, end, changed=False)
        ex = pick.exchange
        if self.error_body is not None:
            if sum(map(len, self.error_body)) < _ERROR_BODY_LIMIT:
                self.error_body.append(chunk)
            if not end:
                return self._body_answer(b"", False, changed=True)
            err = normalise_upstream_error(self.status, b"".join(self.error_body))
            ex.outcome = "upstream_error"
            return self._body_answer(orjson.dumps(err.body()), True, changed=True)
        if self.splitter is not None:
            if chunk and ex.first_chunk_at is None:
                ex.first_chunk_at = self.clock()
                self.decider.first_token(pick)
            events = self.splitter.feed(chunk)
            if end:
                rest = self.splitter.rest()
                if rest:
                    events.append(rest)
            kept = []
            for event in events:
                usage, usage_only = usage_of(event)
                if usage is not None:
                    ex.usage = usage
                if usage_only and not ex.client_wants_usage:
                    continue
                kept.append(event)
            body = b"".join(kept)
            return self._body_answer(body, end, changed=body != chunk)
        if self.json_body is not None and self.json_size < _JSON_USAGE_LIMIT:
            self.json_body.append(chunk)
            self.json_size += len(chunk)
        return self._body_answer(chunk, end, changed=False)

    def _body_answer(self, body: bytes, end: bool, *, changed: bool) -> list[ep.ProcessingResponse]:
        if self.response_mode == _FULL_DUPLEX:
            return [ep.ProcessingResponse(response_body=ep.BodyResponse(response=ep.CommonResponse(
                body_mutation=ep.BodyMutation(streamed_response=part)))) for part in wire.body_chunks(body, end)]
        common = ep.CommonResponse()
        if changed:
            common.body_mutation.body = body
        return [ep.ProcessingResponse(response_body=ep.BodyResponse(response=common))]

    async def _end_response(self) -> None:
        pick = self.pick
        self.done = True
        if pick is None or self._finished:
            return
        ex = pick.exchange
        if self.json_body is not None and self.json_body:
            body = b"".join(self.json_body)
            if b'"usage"' in body:
                ex.usage = _usage(body) or ex.usage
        if ex.outcome == "pending":
            ex.outcome = "ok" if 0 < self.status < 400 else "upstream_error"
        self._finished = True
        await self.decider.finish(pick)

    async def close(self, *, cancelled: bool) -> None:
        """The gRPC stream ended: account for a request that never saw its response end."""
        pick = self.pick
        if pick is None or self._finished:
            return
        self._finished = True
        ex = pick.exchange
        if ex.outcome == "pending":
            ex.outcome = "client_disconnect" if cancelled else "error"
        await self.decider.finish(pick)


def _usage(body: bytes) -> dict[str, Any] | None:
    try:
        usage = orjson.loads(body).get("usage")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return usage if isinstance(usage, dict) else None
