"""A do-nothing ext_proc server on the sidecar's stack (grpc.aio, xds-protos, uvloop): it names one
fixed destination and passes everything else on, answering each message Envoy sends as the
sidecar does. `bench_extproc.py` measures it next to `gravity extproc` as the floor that gRPC in
Python and Envoy's ext_proc filter put under any processor written this way.

    python loadtests/null_extproc.py --port 9100 --destination 127.0.0.1:8000 [--skip-response]
"""
from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from typing import Any

import grpc
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from gateway.extproc.pb import SERVICE_NAME, core, ep, ep_grpc, modes

_FD = modes.ProcessingMode.FULL_DUPLEX_STREAMED


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
        full_duplex = headers_answered = False
        async for msg in requests:
            kind = msg.WhichOneof("request")
            if msg.HasField("protocol_config"):
                full_duplex = msg.protocol_config.request_body_mode == _FD
            if kind == "request_headers":
                if full_duplex:
                    continue  # answered with the body, as the sidecar does
                answer = ep.ProcessingResponse(request_headers=ep.HeadersResponse())
                if self.skip is not None:
                    answer.mode_override.CopyFrom(self.skip)
                    answer.mode_override.request_body_mode = msg.protocol_config.request_body_mode
                yield answer
            elif kind == "request_body":
                if full_duplex:
                    if not headers_answered:
                        headers_answered = True
                        yield ep.ProcessingResponse(request_headers=ep.HeadersResponse(response=ep.CommonResponse(
                            header_mutation=self.mutation, clear_route_cache=True)))
                    yield ep.ProcessingResponse(request_body=ep.BodyResponse(response=ep.CommonResponse(
                        body_mutation=ep.BodyMutation(streamed_response=ep.StreamedBodyResponse(
                            body=msg.request_body.body, end_of_stream=msg.request_body.end_of_stream)))))
                else:
                    yield ep.ProcessingResponse(request_body=ep.BodyResponse(response=ep.CommonResponse(
                        header_mutation=self.mutation, clear_route_cache=True)))
            elif kind == "request_trailers":
                yield ep.ProcessingResponse(request_trailers=ep.TrailersResponse())
            elif kind == "response_headers":
                yield ep.ProcessingResponse(response_headers=ep.HeadersResponse())
            elif kind == "response_body":
                body = msg.response_body
                if full_duplex:
                    yield ep.ProcessingResponse(response_body=ep.BodyResponse(response=ep.CommonResponse(
                        body_mutation=ep.BodyMutation(streamed_response=ep.StreamedBodyResponse(
                            body=body.body, end_of_stream=body.end_of_stream)))))
                else:
                    yield ep.ProcessingResponse(response_body=ep.BodyResponse())
                if body.end_of_stream:
                    return
            elif kind == "response_trailers":
                yield ep.ProcessingResponse(response_trailers=ep.TrailersResponse())
                return


async def _serve(port: int, destination: str, skip_response: bool) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    ep_grpc.add_ExternalProcessorServicer_to_server(NullProcessor(destination, skip_response), server)
    health = HealthServicer()
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--destination", required=True)
    ap.add_argument("--skip-response", action="store_true", help="tell Envoy to skip the response phases")
    args = ap.parse_args()
    uvloop.run(_serve(args.port, args.destination, args.skip_response))


if __name__ == "__main__":
    main()
