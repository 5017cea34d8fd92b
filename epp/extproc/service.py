"""The gRPC service `envoy.service.ext_proc.v3.ExternalProcessor/Process` on grpc.aio."""

from __future__ import annotations

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from epp.extproc.director import Director
from epp.extproc.handler import StreamHandler

DEFAULT_MAX_BODY = 16 * 1024 * 1024


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):
    def __init__(self, director: Director, max_body: int = DEFAULT_MAX_BODY) -> None:
        self.director = director
        self.max_body = max_body
        self.open_streams = 0

    async def Process(self, request_iterator, context: grpc.aio.ServicerContext):  # noqa: N802 (gRPC name)
        handler = StreamHandler(self.director, self.max_body)
        self.open_streams += 1
        try:
            async for req in request_iterator:
                for resp in handler.handle(req):
                    yield resp
                if handler.waiting is not None:  # flow control holds the request until the pool has room
                    for resp in await handler.resume():
                        yield resp
                if handler.rejected:
                    break  # Envoy ends the HTTP stream after an ImmediateResponse
        finally:
            self.open_streams -= 1
            if not handler.done:
                # The stream ended before the response did: client disconnect or reset.
                handler.finish("cancelled")
