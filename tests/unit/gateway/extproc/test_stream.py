"""ExtProcStream through a scripted Decider: the message sequences Envoy sends in each body mode."""
from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from gateway.errors import GatewayError, ServiceUnavailable
from gateway.exchange import Exchange
from gateway.extproc import wire
from gateway.extproc.decider import Pick, PickRequest
from gateway.extproc.pb import core, ep, struct_pb2
from gateway.extproc.stream import ExtProcStream
from routing.types import RoutingRequest

FD = ep.ProtocolConfiguration(request_body_mode=4, response_body_mode=4)  # FULL_DUPLEX_STREAMED
BUF = ep.ProtocolConfiguration(request_body_mode=2, response_body_mode=2)  # BUFFERED


class ScriptedDecider:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.requests: list[PickRequest] = []
        self.served_at: list[str | None] = []
        self.finished: list[Exchange] = []
        self.rejected: list[GatewayError] = []
        self.first_tokens = 0
        self.locals: list[tuple[str, str, bytes]] = []

    async def decide(self, req: PickRequest) -> Pick:
        self.requests.append(req)
        if self.error is not None:
            raise self.error
        ex = Exchange(request_id="r1", route=req.route, model=req.parsed.model, body=req.parsed.body,
                      raw=req.raw, stream=req.parsed.stream, client_wants_usage=req.parsed.wants_usage,
                      routing=RoutingRequest(model=req.parsed.model, prompt=req.parsed.prompt), forward_headers={})
        ex.backend = "a"
        ex.response_headers["x-ratelimit-remaining-tokens"] = "99"
        return Pick(exchange=ex, addresses=["10.0.0.1:8000", "10.0.0.2:8000"],
                    set_headers={"accept-encoding": "identity"}, remove_headers=["authorization"],
                    body=ex.upstream_body(), scores={"10.0.0.1:8000": 0.9}, echo_request_id="client-id")

    async def served(self, pick: Pick, address: str | None) -> None:
        self.served_at.append(address)

    def first_token(self, pick: Pick) -> None:
        self.first_tokens += 1

    async def finish(self, pick: Pick) -> None:
        self.finished.append(pick.exchange)

    async def reject(self, err: GatewayError, pick: Pick | None) -> None:
        self.rejected.append(err)

    async def local(self, method: str, target: str, headers: Any, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        self.locals.append((method, target, body))
        return 201, [("content-type", "application/json"), ("set-cookie", "a"), ("set-cookie", "b")], b'{"ok":1}'


def _headers(path: str = "/v1/chat/completions", method: str = "POST", eos: bool = False,
             protocol: ep.ProtocolConfiguration = FD, subset: Any = None, **extra: str) -> ep.ProcessingRequest:
    pairs = {":method": method, ":path": path, "content-type": "application/json", "authorization": "Bearer k",
             **extra}
    msg = ep.ProcessingRequest(request_headers=ep.HttpHeaders(
        headers=core.HeaderMap(headers=[core.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]),
        end_of_stream=eos), protocol_config=protocol)
    if subset is not None:
        value = struct_pb2.Struct()
        value.update({wire.SUBSET: subset})
        msg.metadata_context.filter_metadata[wire.SUBSET_NAMESPACE].CopyFrom(value)
    return msg


def _body(data: bytes, eos: bool) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=data, end_of_stream=eos))


def _resp_headers(status: int = 200, content_type: str = "application/json", served: str | None = None,
                  attribute: str | None = None) -> ep.ProcessingRequest:
    pairs = {":status": str(status), "content-type": content_type}
    msg = ep.ProcessingRequest(response_headers=ep.HttpHeaders(
        headers=core.HeaderMap(headers=[core.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()])))
    if served is not None:
        lb = struct_pb2.Struct()
        lb.update({wire.SERVED: served})
        msg.metadata_context.filter_metadata[wire.LB_NAMESPACE].CopyFrom(lb)
    if attribute is not None:
        attrs = struct_pb2.Struct()
        attrs.update({"upstream.address": attribute})
        msg.attributes[wire.FILTER_NAME].CopyFrom(attrs)
    return msg


def _resp_body(data: bytes, eos: bool) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(response_body=ep.HttpBody(body=data, end_of_stream=eos))


def _set(mutation: ep.HeaderMutation) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()


async def test_full_duplex_holds_the_body_then_answers_headers_and_body_in_order() -> None:
    d = ScriptedDecider()
    s = ExtProcStream(d, max_body_bytes=1 << 20)
    assert await s.handle(_headers()) == []
    assert await s.handle(_body(CHAT[:10], False)) == []
    out = await s.handle(_body(CHAT[10:], True))
    assert [m.WhichOneof("response") for m in out] == ["request_headers", "request_body"]
    head = out[0].request_headers.response
    assert head.clear_route_cache
    sets = _set(head.header_mutation)
    assert sets[wire.DESTINATION] == "10.0.0.1:8000,10.0.0.2:8000"
    assert list(head.header_mutation.remove_headers) == ["authorization"]
    lb = out[0].dynamic_metadata.fields[wire.LB_NAMESPACE].struct_value.fields
    assert lb[wire.DESTINATION].string_value == sets[wire.DESTINATION]  # the same value both ways
    assert lb[wire.SCORES].struct_value.fields["10.0.0.1:8000"].number_value == 0.9
    sent = out[1].request_body.response.body_mutation.streamed_response
    assert sent.end_of_stream
    # A stream whose client did not ask for usage gets include_usage (and a matching length).
    assert orjson.loads(sent.body)["stream_options"] == {"include_usage": True}
    assert sets["content-length"] == str(len(sent.body))
    assert d.requests[0].raw == CHAT and d.requests[0].parsed.model == "m"


async def test_buffered_answers_headers_at_once_and_decides_on_the_body() -> None:
    d = ScriptedDecider()
    s = ExtProcStream(d, max_body_bytes=1 << 20)
    out = await s.handle(_headers(path="/v1/completions", protocol=BUF))
    assert [m.WhichOneof("response") for m in out] == ["request_headers"]
    assert not out[0].request_headers.response.HasField("header_mutation")
    body = json.dumps({"model": "m", "prompt": "x"}).encode()
    out = await s.handle(_body(body, True))
    assert [m.WhichOneof("response") for m in out] == ["request_body"]
    common = out[0].request_body.response
    assert common.clear_route_cache and wire.DESTINATION in _set(common.header_mutation)
    assert not common.HasField("body_mutation")  # unchanged body: nothing to replace
    assert out[0].dynamic_metadata.fields[wire.LB_NAMESPACE]


@pytest.mark.parametrize("subset", [["10.0.0.1:8000", "10.0.0.3:8000"], "10.0.0.1:8000, 10.0.0.3:8000",
                                    [], ""])
async def test_subset_hint_reaches_the_decider_as_a_list(subset: Any) -> None:
    d = ScriptedDecider()
    s = ExtProcStream(d, max_body_bytes=1 << 20)
    await s.handle(_headers(subset=subset))
    await s.handle(_body(CHAT, True))
    want = [] if not subset else ["10.0.0.1:8000", "10.0.0.3:8000"]
    assert d.requests[0].subset == want


async def test_no_subset_hint_is_none_not_empty() -> None:
    d = ScriptedDecider()
    s = ExtProcStream(d, max_body_bytes=1 << 20)
    await s.handle(_headers())
    await s.handle(_body(CHAT, True))
    assert d.requests[0].subset is None


async def test_a_decider_error_is_an_openai_shaped_immediate_response() -> None:
    d = ScriptedDecider(ServiceUnavailable("none left", code="no_healthy_backend", retry_after=2.2))
    s = ExtProcStream(d, max_body_bytes=1 << 20)
    await s.handle(_headers())
    out = await s.handle(_body(CHAT, True))
    assert [m.WhichOneof("response") for m in out] == ["immediate_response"]
    ir = out[0].immediate_response
    assert ir.status.code == 503
    assert _set(ir.headers)["retry-after"] == "3"
    assert orjson.loads(ir.body)["error"]["code"] == "no_healthy_backend"
    assert s.done
    await s.close(cancelled=False)
    assert d.finished == []  # the decider accounted for its own failure


@pytest.mark.parametrize(("raw", "code"), [(b"{nope", "invalid_json"), (b'{"messages": []}',
                                                                         "missing_required_parameter")])
async def test_bad_json_is_the_parsers_400_and_never_reaches_the_decider(raw: bytes, code: str) -> None:
    d = ScriptedDecider()
    s = ExtProcStream(d, max_body_bytes=1 << 20)
    await s.handle(_headers())
    out = await s.handle(_body(raw, True))
    assert out[0].immediate_response.status.code == 400
    assert orjson.loads(out[0].immediate_response.body)["error"]["code"] == code
    assert d.requests == [] and [e.status for e in d.rejected] == [400]


async def test_oversized_bodies_by_header_and_by_count() -> None:
    d = ScriptedDecider()
    s = ExtProcStream(d, max_body_bytes=100)
    out = await s.handle(_headers(**{"content-length": "101"}))  # type: ignore[arg-type]  # a header, not a parameter
    assert out[0].immediate_response.status.code == 413
    s = ExtProcStream(d, max_body_bytes=100)
    await s.handle(_headers())
    assert await s.handle(_body(b"x" * 60, False)) == []
    out = await s.handle(_body(b"x" * 60, False))
    assert out[0].immediate_response.status.code == 413


@pytest.mark.parametrize("protocol", [FD, BUF])
async def test_other_routes_are_answered_by_the_gateway_app_after_their_body(protocol: ep.ProtocolConfiguration
                                                                             ) -> None:
    d = ScriptedDecider()
    s = ExtProcStream(d, max_body_bytes=100)
    out = await s.handle(_headers(path="/v1/models?x=1", method="GET", eos=True, protocol=protocol))
    ir = out[0].immediate_response
    assert d.locals == [("GET", "/v1/models?x=1", b"")] and ir.status.code == 201 and ir.body == b'{"ok":1}'
    actions = [(h.header.key, h.append_action) for h in ir.headers.set_headers]
    assert actions[1:] == [("set-cookie", 2), ("set-cookie", 0)]  # overwrite, then append: both kept
    s = ExtProcStream(d, max_body_bytes=100)
    first = await s.handle(_headers(path="/v1/responses", protocol=protocol))
    assert [m.WhichOneof("response") for m in first] == ([] if protocol is FD else ["request_headers"])
    out = await s.handle(_body(b'{"input": "hi"}', True))
    assert d.locals[-1] == ("POST", "/v1/responses", b'{"input": "hi"}') and s.done
    assert d.requests == []  # never scheduled as an inference request


def _sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


async def _decided(d: ScriptedDecider, body: bytes = CHAT, path: str = "/v1/chat/completions") -> ExtProcStream:
    s = ExtProcStream(d, max_body_bytes=1 << 20)
    await s.handle(_headers(path=path))
    await s.handle(_body(body, True))
    return s


async def test_stream_usage_is_read_and_its_extra_chunk_dropped_even_when_split_across_chunks() -> None:
    d = ScriptedDecider()
    s = await _decided(d)
    out = await s.handle(_resp_headers(content_type="text/event-stream", served="10.0.0.2:8000"))
    sets = _set(out[0].response_headers.response.header_mutation)
    assert sets["x-ratelimit-remaining-tokens"] == "99" and sets["x-request-id"] == "client-id"
    assert d.served_at == ["10.0.0.2:8000"]
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    raw = _sse({"choices": [{"delta": {"content": "a"}}]}, {"choices": [{"delta": {"content": "b"}}]},
               {"choices": [], "usage": usage})
    cut = raw.index(b'"usage"')  # split inside the usage event
    got = b""
    for chunk, eos in ((raw[:7], False), (raw[7:cut], False), (raw[cut:], True)):
        for m in await s.handle(_resp_body(chunk, eos)):
            part = m.response_body.response.body_mutation.streamed_response
            got += part.body
            last = part.end_of_stream
    assert last
    assert b'"usage"' not in got and got.endswith(b"data: [DONE]\n\n") and got.count(b"data:") == 3
    assert d.finished and d.finished[0].usage == usage and d.finished[0].outcome == "ok"
    assert d.first_tokens == 1
    await s.close(cancelled=True)
    assert len(d.finished) == 1  # finished exactly once


async def test_json_usage_is_read_without_holding_the_body() -> None:
    d = ScriptedDecider()
    s = await _decided(d, json.dumps({"model": "m", "prompt": "x"}).encode(), "/v1/completions")
    await s.handle(_resp_headers(attribute="10.0.0.1:8000"))
    body = orjson.dumps({"choices": [{"text": "hey"}], "usage": {"total_tokens": 9}})
    first = await s.handle(_resp_body(body[:20], False))
    assert first[0].response_body.response.body_mutation.streamed_response.body == body[:20]
    await s.handle(_resp_body(body[20:], True))
    assert d.served_at == ["10.0.0.1:8000"]
    assert d.finished[0].usage == {"total_tokens": 9}


async def test_upstream_errors_are_rewritten_to_the_openai_shape() -> None:
    d = ScriptedDecider()
    s = await _decided(d)
    out = await s.handle(_resp_headers(status=503, content_type="text/plain"))
    mutation = out[0].response_headers.response.header_mutation
    assert _set(mutation)["content-type"] == "application/json" and "content-length" in mutation.remove_headers
    held = await s.handle(_resp_body(b"upstream connect error", False))
    assert held[0].response_body.response.body_mutation.streamed_response.body == b""
    out = await s.handle(_resp_body(b" or disconnect", True))
    err = orjson.loads(out[0].response_body.response.body_mutation.streamed_response.body)["error"]
    assert err["message"] == "upstream connect error or disconnect" and err["type"] == "server_error"
    assert d.finished[0].outcome == "upstream_error"


async def test_a_stream_cut_before_the_response_ended_is_still_finished_once() -> None:
    d = ScriptedDecider()
    s = await _decided(d)
    await s.handle(_resp_headers(content_type="text/event-stream"))
    await s.close(cancelled=True)
    await s.close(cancelled=True)
    assert [ex.outcome for ex in d.finished] == ["client_disconnect"]


@pytest.mark.parametrize(("served", "attribute", "want"), [
    ("10.0.0.2:8000", "10.0.0.1:8000", "10.0.0.2:8000"),  # the proxy's own report wins
    (["10.0.0.2:8000", "10.0.0.1:8000"], None, "10.0.0.2:8000"),  # a list: its first
    ("10.0.0.2:8000,10.0.0.1:8000", None, "10.0.0.2:8000"),
    ("", "10.0.0.1:8000", "10.0.0.1:8000"),  # an empty report: the upstream address
    (None, "10.0.0.1:8000", "10.0.0.1:8000"),
    (None, None, None),
])
def test_the_served_endpoint_from_metadata_else_the_upstream_address(served: Any, attribute: str | None,
                                                                     want: str | None) -> None:
    assert wire.served_endpoint(_resp_headers(served=served, attribute=attribute)) == want


STREAMED_RESPONSES = ep.ProtocolConfiguration(request_body_mode=2, response_body_mode=1)  # BUFFERED, STREAMED


class UnsettledDecider(ScriptedDecider):
    """No token budget holds this request: nothing waits for its usage."""

    async def decide(self, req: PickRequest) -> Pick:
        pick = await super().decide(req)
        pick.settles = False
        return pick


async def _answer_headers(d: ScriptedDecider, read_response: str, protocol: ep.ProtocolConfiguration,
                          body: bytes, status: int = 200, content_type: str = "application/json"
                          ) -> tuple[ExtProcStream, ep.ProcessingResponse]:
    s = ExtProcStream(d, max_body_bytes=1 << 20, read_response=read_response)
    await s.handle(_headers(path="/v1/completions", protocol=protocol))
    await s.handle(_body(body, True))
    out = await s.handle(_resp_headers(status=status, content_type=content_type))
    return s, out[0]


PLAIN = json.dumps({"model": "m", "prompt": "x"}).encode()
STREAM = json.dumps({"model": "m", "prompt": "x", "stream": True}).encode()


async def test_an_answer_nothing_settles_from_is_not_read_when_so_configured() -> None:
    d = UnsettledDecider()
    s, answer = await _answer_headers(d, "when_settling", STREAMED_RESPONSES, PLAIN)
    mode = answer.mode_override
    assert answer.HasField("mode_override") and mode.response_body_mode == 0  # NONE: Envoy passes it on
    assert _set(answer.response_headers.response.header_mutation)["x-request-id"] == "client-id"
    assert s.done and [ex.outcome for ex in d.finished] == ["ok"]  # finished with the headers
    await s.close(cancelled=False)
    assert len(d.finished) == 1


@pytest.mark.parametrize(("decider", "read_response", "protocol", "body", "status"), [
    (UnsettledDecider, "always", STREAMED_RESPONSES, PLAIN, 200),  # the default reads every answer
    (ScriptedDecider, "when_settling", STREAMED_RESPONSES, PLAIN, 200),  # a budget waits for the usage
    (UnsettledDecider, "when_settling", STREAMED_RESPONSES, STREAM, 200),  # streams: first token, end
    (UnsettledDecider, "when_settling", STREAMED_RESPONSES, PLAIN, 503),  # errors are rewritten
    (UnsettledDecider, "when_settling", FD, PLAIN, 200),  # full duplex: Envoy ignores overrides
])
async def test_answers_are_read_whenever_something_needs_them(decider: type[ScriptedDecider], read_response: str,
                                                              protocol: ep.ProtocolConfiguration, body: bytes,
                                                              status: int) -> None:
    d = decider()
    s, answer = await _answer_headers(d, read_response, protocol, body, status,
                                      "text/event-stream" if body is STREAM else "application/json")
    assert not answer.HasField("mode_override")
    assert not s.done and d.finished == []
