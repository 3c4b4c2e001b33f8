"""A do-nothing ext_proc server on the sidecar's stack (grpc.aio, xds-protos, uvloop): it names one
fixed destination and passes everything else on, answering each message Envoy sends as the
sidecar does. `bench_extproc.py` measures it next to `gravity extproc` as the floor that gRPC in
Python and Envoy's ext_proc filter put under any processor written this way.

    python loadtests/null_extproc.py --port 9100 --destination 127.0.0.1:8000 [--skip-response]
        [--server aio-uvloop|aio-asyncio|sync] [--option grpc.some_arg=value ...]
"""
from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from gateway.extproc.pb import SERVICE_NAME, core, ep, ep_grpc, modes

_FD = modes.ProcessingMode.FULL_DUPLEX_STREAMED


class _Answers:
    """The answers to one stream's messages, message by message (no I/O)."""

    def __init__(self, mutation: ep.HeaderMutation, skip: modes.ProcessingMode | None) -> None:
        self.mutation, self.skip = mutation, skip
        self.full_duplex = self.headers_answered = self.ended = False

    def __call__(self, msg: ep.ProcessingRequest) -> list[ep.ProcessingResponse]:
        kind = msg.WhichOneof("request")
        if msg.HasField("protocol_config"):
            self.full_duplex = msg.protocol_config.request_body_mode == _FD
        if kind == "request_headers":
            if self.full_duplex:
                return []  # answered with the body, as the sidecar does
            answer = ep.ProcessingResponse(request_headers=ep.HeadersResponse())
            if self.skip is not None:
                answer.mode_override.CopyFrom(self.skip)
                answer.mode_override.request_body_mode = msg.protocol_config.request_body_mode
            return [answer]
        if kind == "request_body":
            body = msg.request_body
            if not self.full_duplex:
                return [ep.ProcessingResponse(request_body=ep.BodyResponse(response=ep.CommonResponse(
                    header_mutation=self.mutation, clear_route_cache=True)))]
            out = []
            if not self.headers_answered:
                self.headers_answered = True
                out.append(ep.ProcessingResponse(request_headers=ep.HeadersResponse(response=ep.CommonResponse(
                    header_mutation=self.mutation, clear_route_cache=True))))
            out.append(ep.ProcessingResponse(request_body=ep.BodyResponse(response=ep.CommonResponse(
                body_mutation=ep.BodyMutation(streamed_response=ep.StreamedBodyResponse(
                    body=body.body, end_of_stream=body.end_of_stream))))))
            return out
        if kind == "request_trailers":
            return [ep.ProcessingResponse(request_trailers=ep.TrailersResponse())]
        if kind == "response_headers":
            return [ep.ProcessingResponse(response_headers=ep.HeadersResponse())]
        if kind == "response_body":
            body = msg.response_body
            self.ended = body.end_of_stream
            if self.full_duplex:
                return [ep.ProcessingResponse(response_body=ep.BodyResponse(response=ep.CommonResponse(
                    body_mutation=ep.BodyMutation(streamed_response=ep.StreamedBodyResponse(
                        body=body.body, end_of_stream=body.end_of_stream)))))]
            return [ep.ProcessingResponse(response_body=ep.BodyResponse())]
        if kind == "response_trailers":
            self.ended = True
            return [ep.ProcessingResponse(response_trailers=ep.TrailersResponse())]
        return []


class NullProcessor(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, destination: str, skip_response: bool) -> None:
        self.mutation = ep.HeaderMutation(set_headers=[core.HeaderValueOption(
            header=core.HeaderValue(key="x-gateway-destination-endpoint", raw_value=destination.encode()),
            append_action=core.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)])
        self.skip = modes.ProcessingMode(response_header_mode=modes.ProcessingMode.SKIP,
                                         response_body_mode=modes.ProcessingMode.NONE,
                                         response_trailer_mode=modes.ProcessingMode.SKIP) if skip_response else None

    async def Process(self, requests: AsyncIterator[ep.ProcessingRequest],
                      context: Any) -> AsyncIterator[ep.ProcessingResponse]:
        answers = _Answers(self.mutation, self.skip)
        async for msg in requests:
            for out in answers(msg):
                yield out
            if answers.ended:
                return


class SyncNullProcessor(NullProcessor):
    """The same answers on grpc's thread-pool server (one thread per open stream)."""

    def Process(self, requests: Iterator[ep.ProcessingRequest], context: Any  # type: ignore[override]
                ) -> Iterator[ep.ProcessingResponse]:
        answers = _Answers(self.mutation, self.skip)
        for msg in requests:
            yield from answers(msg)
            if answers.ended:
                return


def _options(pairs: list[str]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = [("grpc.so_reuseport", 0)]
    for pair in pairs:
        key, _, value = pair.partition("=")
        out.append((key, int(value) if value.lstrip("-").isdigit() else value))
    return out


async def _serve(port: int, destination: str, skip_response: bool, options: list[tuple[str, Any]]) -> None:
    server = grpc.aio.server(options=options)
    ep_grpc.add_ExternalProcessorServicer_to_server(NullProcessor(destination, skip_response), server)
    health = HealthServicer()
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def _serve_sync(port: int, destination: str, skip_response: bool, options: list[tuple[str, Any]]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from grpc_health.v1.health import HealthServicer as SyncHealth

    server = grpc.server(ThreadPoolExecutor(max_workers=64), options=options)
    ep_grpc.add_ExternalProcessorServicer_to_server(SyncNullProcessor(destination, skip_response), server)
    health = SyncHealth()
    health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    server.wait_for_termination()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--destination", required=True)
    ap.add_argument("--skip-response", action="store_true", help="tell Envoy to skip the response phases")
    ap.add_argument("--server", choices=["aio-uvloop", "aio-asyncio", "sync"], default="aio-uvloop")
    ap.add_argument("--option", action="append", default=[], help="a gRPC server option, key=value")
    args = ap.parse_args()
    options = _options(args.option)
    if args.server == "sync":
        _serve_sync(args.port, args.destination, args.skip_response, options)
    elif args.server == "aio-asyncio":
        asyncio.run(_serve(args.port, args.destination, args.skip_response, options))
    else:
        uvloop.run(_serve(args.port, args.destination, args.skip_response, options))


if __name__ == "__main__":
    main()
