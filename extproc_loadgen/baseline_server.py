"""The gRPC floor: an ext_proc server that routes every request to one fixed endpoint.

Same message flow as the EPP (deferred headers reply, body re-emitted, response phases
answered) but no parsing, scheduling, logging or metrics, so `extproc-loadgen --baseline`
shows how much of the EPP's cost is grpc-python itself on this machine.
"""

from __future__ import annotations

import argparse
import asyncio

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from epp.extproc import messages as msg

FIXED = "10.0.0.1:8000"


class BaselineProcessor(pb_grpc.ExternalProcessorServicer):
    def __init__(self, destination: str = FIXED) -> None:
        self.destination = destination

    async def Process(self, request_iterator, context):  # noqa: N802
        dest = self.destination
        async for r in request_iterator:
            kind = r.WhichOneof("request")
            if kind == "request_body" and r.request_body.end_of_stream:
                yield msg.request_headers_response({msg.DESTINATION_HEADER: dest}, clear_route_cache=True,
                                                   metadata=msg.destination_metadata(dest))
                for out in msg.streamed_chunks(r.request_body.body, request=True):
                    yield out
            elif kind == "response_headers":
                yield msg.response_headers_response()
            elif kind == "response_body":
                for out in msg.streamed_chunks(r.response_body.body, request=False, end_of_stream=r.response_body.end_of_stream):
                    yield out


async def serve(port: int, destination: str = FIXED) -> None:
    server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(BaselineProcessor(destination), server)
    health = health_aio.HealthServicer()  # Envoy's health check of its ext_proc cluster asks for this
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for service in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--destination", default=FIXED, help="ip:port every request is routed to (default: %(default)s)")
    args = p.parse_args()
    asyncio.run(serve(args.port, args.destination))


if __name__ == "__main__":
    main()
