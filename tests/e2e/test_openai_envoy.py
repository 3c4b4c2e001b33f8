"""The openai SDK -> Envoy -> simulators, with `gravity extproc` deciding: answers equal the
simulator's own apart from the documented mutations, and errors equal the proxy's."""
from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from gateway.errors import to_gateway_error
from gateway.openai_requests import parse_body
from tests.e2e.stack import MODEL, Stack, stack
from tests.support.procs import start_sim

BODY_MODES = ["FULL_DUPLEX_STREAMED", "BUFFERED"]


@pytest.fixture(scope="module", params=BODY_MODES)
def st(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    mode = request.param
    # Buffered also runs with `read_response: when_settling`: answers nothing settles from are not read.
    extproc = {"body_mode": mode.lower(), **({"read_response": "when_settling"} if mode == "BUFFERED" else {})}
    # Shedding: an endpoint with one request of this sidecar in flight counts as saturated.
    policies = {"priority": {"shed_inflight_threshold": 1}}
    with stack(tmp_path_factory.mktemp(f"openai-{mode}"), request_body_mode=mode, extproc=extproc,
               policies=policies) as s:
        s.mode = mode
        yield s


def _post(port: int, path: str, body: bytes | dict[str, Any], headers: dict[str, str] | None = None
          ) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, raw, {"content-type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


def _port(st: Stack) -> int:
    assert st.envoy is not None
    return st.envoy.port


def _events(raw: bytes) -> list[Any]:
    out = []
    for block in raw.split(b"\n\n"):
        if block.startswith(b"data: "):
            data = block[6:]
            out.append(data.decode() if data == b"[DONE]" else _without_created(json.loads(data)))
    return out


def _without_created(obj: dict[str, Any]) -> dict[str, Any]:
    """The answer minus what differs between two runs of one request: the clock, and the cache
    hit the second run gets from the first."""
    out = {k: v for k, v in obj.items() if k != "created"}
    if isinstance(out.get("usage"), dict):
        out["usage"] = {k: v for k, v in out["usage"].items() if k != "prompt_tokens_details"}
    return out


@pytest.mark.parametrize("route", ["chat/completions", "completions"])
@pytest.mark.parametrize(("stream", "client_usage"), [(False, False), (True, False), (True, True)])
def test_answers_equal_the_simulators_own(st: Stack, route: str, stream: bool, client_usage: bool) -> None:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 6, "seed": 7, "stream": stream}
    if route == "chat/completions":
        body["messages"] = [{"role": "user", "content": f"compare {route} {stream} {client_usage}"}]
    else:
        body["prompt"] = f"compare {route} {stream} {client_usage}"
    if client_usage:
        body["stream_options"] = {"include_usage": True}
    rid = f"cmp-{route.replace('/', '-')}-{int(stream)}{int(client_usage)}-{id(st)}"
    status, headers, through = _post(_port(st), f"/v1/{route}", body, {"x-request-id": rid})
    assert status == 200, through
    served = st.served_by(rid)
    assert len(served) == 1
    # The same request straight to the simulator that served it (same id and seed: same tokens).
    _, _, direct = _post(st.sims[served[0]].port, f"/v1/{route}", body, {"x-request-id": rid + "-direct"})
    direct = direct.replace(rid.encode() + b"-direct", rid.encode())
    if stream:
        assert headers["content-type"].startswith("text/event-stream")
        got, want = _events(through), _events(direct)
        assert got == want  # usage chunk only when the client asked: the sidecar's include_usage is dropped
        assert any("usage" in e and e["choices"] == [] for e in got if isinstance(e, dict)) == client_usage
    else:
        assert _without_created(json.loads(through)) == _without_created(json.loads(direct))
    # The sidecar asked for usage on every stream: the simulator saw include_usage either way.
    record = next(r for r in _sim_records(st, served[0]) if r["request_id"].endswith(rid))
    assert record["status"] == "finished"
    assert headers["x-request-id"] == rid


def _sim_records(st: Stack, index: int) -> list[dict[str, Any]]:
    from tests.e2e.stack import sim_requests

    return sim_requests(st.sims[index].port)


def test_openai_sdk_through_envoy(st: Stack) -> None:
    client = openai.OpenAI(base_url=st.base, api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model=MODEL, max_tokens=4,
                                           messages=[{"role": "user", "content": "Hello through Envoy"}])
    assert reply.choices[0].message.content and reply.usage is not None and reply.usage.completion_tokens >= 1
    chunks = list(client.chat.completions.create(model=MODEL, max_tokens=4, stream=True,
                                                 messages=[{"role": "user", "content": "Stream, please"}]))
    assert chunks and all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    done = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=3)
    assert done.choices[0].text and done.usage is not None
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    client.close()


@pytest.mark.parametrize("raw", [b"{not json", b"[]", b'{"model": 3, "messages": []}',
                                 b'{"model": "sim-llama", "messages": "hi"}',
                                 b'{"model": "sim-llama", "messages": [{"role": "user"}], "max_tokens": -1}'])
def test_bad_input_gets_the_proxys_400(st: Stack, raw: bytes) -> None:
    status, headers, body = _post(_port(st), "/v1/chat/completions", raw)
    try:
        parse_body("chat/completions", raw)
    except Exception as exc:  # noqa: BLE001 - the expected error is whatever the proxy's parser raises
        want = to_gateway_error(exc)
    else:
        raise AssertionError("the parser accepted a bad body")
    assert status == want.status == 400
    assert json.loads(body) == want.body()
    assert headers["content-type"] == "application/json"


def test_unknown_model_route_and_oversized_body(st: Stack) -> None:
    client = openai.OpenAI(base_url=st.base, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert missing.value.code == "model_not_found"
    status, _, body = _post(_port(st), "/v1/nothing-here", {"model": MODEL})
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    client.close()


@pytest.mark.parametrize("chunked", [False, True])
def test_an_oversized_body_is_refused_with_413(st: Stack, chunked: bool) -> None:
    """Announced by content-length (refused before the body), or streamed past the limit."""
    size = 9 * 1024 * 1024
    head = (b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + (b"transfer-encoding: chunked\r\n" if chunked else f"content-length: {size}\r\n".encode())
            + b"\r\n")
    with socket.create_connection(("127.0.0.1", _port(st)), timeout=30) as sock:
        sock.sendall(head)
        piece = b'{"model": "sim-llama", "prompt": "' + b"x" * 65_000
        sent = 0
        with contextlib.suppress(OSError):  # Envoy may reset once it has answered
            while sent < size:
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece)
                sent += len(piece)
                piece = b"x" * 65_000
        reply = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                more = sock.recv(65536)
                if not more:
                    break
                reply += more
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    body = reply.split(b"\r\n\r\n", 1)[1]
    if b"\r\n" in body:  # chunked framing around the JSON
        body = body.split(b"\r\n")[1]
    error = json.loads(body)["error"]
    # BUFFERED: Envoy's own buffer limit (1 MiB by default) answers first, through the local-reply
    # mapper of config/envoy.yaml; otherwise the sidecar's limit (server.max_body_bytes) does.
    assert error["code"] == ("request_payload_too_large" if chunked and st.mode == "BUFFERED"
                             else "request_too_large")
    assert error["type"] and "message" in error


def test_a_client_cannot_steer_the_request(st: Stack) -> None:
    """ORIGINAL_DST connects wherever `x-gateway-destination-endpoint` says: a client's copy of it
    (or of the subset hint) must never reach Envoy's router."""
    outsider = start_sim(st.tmp, MODEL, ["--profile", "tiny"])
    try:
        target = f"127.0.0.1:{outsider.port}"
        for name in ("x-gateway-destination-endpoint", "X-Gateway-Destination-Endpoint",
                     "x-gateway-destination-endpoint-subset", "x-gateway-destination-endpoint-served"):
            for _ in range(3):
                status, _, body = _post(_port(st), "/v1/completions",
                                        {"model": MODEL, "prompt": "steer me", "max_tokens": 2}, {name: target})
                assert status == 200, body
        from tests.e2e.stack import sim_requests

        assert sim_requests(outsider.port) == []
    finally:
        outsider.stop()


def _stream_timed(port: int, body: dict[str, Any], headers: dict[str, str] | None = None,
                  started: threading.Event | None = None) -> tuple[dict[str, str], list[float], float]:
    """(headers, arrival time of each data event, total) for one streamed request, times from its start."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    t0 = time.monotonic()
    conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(),
                 {"content-type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    arrivals = []
    while line := resp.readline():
        if line.startswith(b"data: "):
            arrivals.append(time.monotonic() - t0)
            if started is not None:
                started.set()
    conn.close()
    return {k.lower(): v for k, v in resp.getheaders()}, arrivals, time.monotonic() - t0


LONG = {"model": MODEL, "max_tokens": 150, "stream": True, "ignore_eos": True,
        "messages": [{"role": "user", "content": "a long answer, please"}]}


def test_a_stream_arrives_as_it_is_generated(st: Stack) -> None:
    _, arrivals, total = _stream_timed(_port(st), LONG)
    assert len(arrivals) >= 150 and total > 0.5  # ~5.5 ms a token on the tiny profile
    # Chunks are passed on as they come, not held to the end (held, every arrival would be at the
    # very end): the first well before the end, and the middle one before the last stretch.
    assert arrivals[0] < total * 0.4, (arrivals[0], total)
    assert arrivals[len(arrivals) // 2] < total * 0.8, (arrivals[len(arrivals) // 2], total)


def test_sheddable_work_is_shed_when_every_endpoint_is_busy(st: Stack) -> None:
    events = [threading.Event(), threading.Event()]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        busy = [pool.submit(_stream_timed, _port(st), {**LONG, "max_tokens": 400}, None, e) for e in events]
        assert all(e.wait(30) for e in events)
        status, headers, body = _post(_port(st), "/v1/completions", {"model": MODEL, "prompt": "later", "max_tokens": 2},
                                      {"x-gravity-priority": "sheddable"})
        standard = _post(_port(st), "/v1/completions", {"model": MODEL, "prompt": "now", "max_tokens": 2})
        backends = {f.result()[0]["x-gravity-backend"] for f in busy}
    assert backends == {"sim-0", "sim-1"}  # both replicas were busy
    assert status == 429, body
    assert json.loads(body)["error"]["code"] == "load_shed" and int(headers["retry-after"]) >= 1
    assert standard[0] == 200  # only sheddable work is refused


def _msgs_sent(st: Stack) -> int:
    """Messages Envoy sent to the sidecar so far (its admin stats)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{st.admin}/stats?filter=ext_proc.stream_msgs_sent", timeout=5) as r:
        return int(r.read().decode().split(":")[-1])


def test_an_answer_nothing_settles_from_is_passed_on_unread(st: Stack) -> None:
    """`read_response: when_settling` (the buffered fixture): Envoy is told at the response headers
    to skip the body; the client still gets all of it. By default (`always`) the body is read."""
    before = _msgs_sent(st)
    status, _, body = _post(_port(st), "/v1/completions", {"model": MODEL, "prompt": "unread", "max_tokens": 5, "ignore_eos": True})
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 5
    sent = _msgs_sent(st) - before
    # request headers, request body, response headers; and when read, the response body (full
    # duplex also sends empty request trailers and may split the body)
    if st.mode == "BUFFERED":
        assert sent == 3, sent
    else:
        assert sent >= 5, sent
