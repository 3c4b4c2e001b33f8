"""The ext_proc sidecar's traces: a real `gravity extproc` process driven over gRPC as Envoy drives it
(buffered body mode), exporting to an in-test OTLP receiver."""
from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from gateway.extproc.pb import core, ep, ep_grpc
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.procs import Proc, free_port, start_sim, write_config

MODEL = "sim-llama"
BUF = ep.ProtocolConfiguration(request_body_mode=2, response_body_mode=2)


def _headers(traceparent: str) -> ep.ProcessingRequest:
    pairs = {":method": "POST", ":path": "/v1/chat/completions", "content-type": "application/json",
             "traceparent": traceparent, "tracestate": "envoy=1"}
    return ep.ProcessingRequest(request_headers=ep.HttpHeaders(
        headers=core.HeaderMap(headers=[core.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()])),
        protocol_config=BUF)


async def _pick(port: int, traceparent: str, body: bytes) -> list[ep.ProcessingResponse]:
    async def messages() -> AsyncIterator[ep.ProcessingRequest]:
        yield _headers(traceparent)
        yield ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True))

    out: list[ep.ProcessingResponse] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = ep_grpc.ExternalProcessorStub(channel).Process(messages())
        async for response in call:
            out.append(response)
            if len(out) == 2:
                call.cancel()
                break
    return out


@pytest.mark.slow
def test_the_pick_is_a_server_span_with_admission_and_routing_children(tmp_path: Path) -> None:
    receiver = OtlpReceiver()
    sim = start_sim(tmp_path, MODEL, ["--profile", "tiny"])
    port = free_port()
    cfg = write_config(tmp_path, {
        "backends": [{"name": "sim-0", "url": f"http://127.0.0.1:{sim.port}", "models": [MODEL]}],
        "state": {"embedded_dir": str(tmp_path / "redis")}, "extproc": {"host": "127.0.0.1", "port": port}})
    proc = Proc([sys.executable, "-m", "gateway", "extproc", "--config", str(cfg)], port, tmp_path / "extproc.log")
    proc.start(env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"})
    try:
        trace_id, client_span = os.urandom(16).hex(), os.urandom(8).hex()
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
        out: list[ep.ProcessingResponse] = []
        for _ in range(50):  # the picker answers 503 until its first scrape
            out = asyncio.run(_pick(port, f"00-{trace_id}-{client_span}-01", body))
            if any(m.WhichOneof("response") == "request_body" for m in out):
                break
            asyncio.run(asyncio.sleep(0.2))
        assert any(m.WhichOneof("response") == "request_body" for m in out), out

        def picked(spans: list) -> bool:  # type: ignore[type-arg]
            return any(s.kind == "SERVER" and s.attributes.get("gravity.outcome") is None
                       and any(c.name == "gravity.route" and c.parent_span_id == s.span_id for c in spans)
                       for s in spans)
        spans = receiver.wait_for(picked, trace_id)
        server = next(s for s in spans if s.kind == "SERVER" and any(
            c.name == "gravity.route" and c.parent_span_id == s.span_id for c in spans))
        assert server.name == "ext_proc POST /v1/chat/completions"
        assert server.parent_span_id == client_span and server.status != "ERROR"
        children = {s.name: s for s in spans if s.parent_span_id == server.span_id}
        assert {"gravity.auth", "gravity.rate_limit", "gravity.route"} <= set(children)
        assert children["gravity.route"].attributes["gravity.route.endpoint"] == "sim-0"
    finally:
        proc.stop()
        sim.stop()
        receiver.close()
