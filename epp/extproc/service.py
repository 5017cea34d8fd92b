"""The gRPC service `envoy.service.ext_proc.v3.ExternalProcessor/Process` on grpc.aio.

Every stream ends cleanly: a bug in handling one message is logged once with the request id,
answered with a 500 ImmediateResponse while the request is still being routed (after that the
stream is closed and Envoy passes the response through), and whatever the request held is
released when the stream ends, however it ends.
"""

from __future__ import annotations

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from epp.extproc import messages as msg
from epp.extproc.body_budget import BodyBudget
from epp.extproc.director import Director
from epp.extproc.handler import StreamHandler
from epp.observability.logging import get_logger

DEFAULT_MAX_BODY = 16 * 1024 * 1024
DEFAULT_BODY_BUDGET = 256 * 1024 * 1024
DRAIN_LIMIT = 1024  # messages read without answer after the stream's end was decided

log = get_logger("epp.extproc")


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):
    def __init__(self, director: Director, max_body: int = DEFAULT_MAX_BODY, body_budget: int = DEFAULT_BODY_BUDGET,
                 trust_model_rewrite_header: bool = False) -> None:
        self.director = director
        self.max_body = max_body
        self.budget = BodyBudget(body_budget)
        self.trust_rewrite = trust_model_rewrite_header
        self.open_streams = 0
        self.stream_errors = 0

    async def Process(self, request_iterator, context: grpc.aio.ServicerContext):  # noqa: N802 (gRPC name)
        handler = StreamHandler(self.director, self.max_body, self.budget, self.trust_rewrite)
        self.open_streams += 1
        drained = 0
        try:
            async for req in request_iterator:
                if handler.ended:
                    # After an ImmediateResponse or a protocol violation nothing more is answered; messages
                    # already in flight are read so the stream still ends with OK when Envoy closes it.
                    drained += 1
                    if drained > DRAIN_LIMIT:
                        break
                    continue
                try:
                    replies = handler.handle(req)
                except Exception as e:  # a bug must cost one request, not the stream's gRPC status
                    replies = self._internal_error(handler, req, e)
                for resp in replies:
                    yield resp
                if handler.waiting is not None:  # flow control holds the request until the pool has room
                    try:
                        replies = await handler.resume()
                    except Exception as e:
                        replies = self._internal_error(handler, req, e)
                    for resp in replies:
                        yield resp
        finally:
            self.open_streams -= 1
            # Stream over — response done, client disconnect, reset, violation or error: release it all.
            handler.release("success" if handler.done else "cancelled")

    def _internal_error(self, handler: StreamHandler, req, error: Exception) -> list:
        self.stream_errors += 1
        kind = req.WhichOneof("request")
        log.error("ext_proc stream failed", request_id=handler.request_id or None, message=kind, phase=handler.phase,
                  error=f"{type(error).__name__}: {error}", exc_info=error)
        routing = kind in ("request_headers", "request_body", "request_trailers")  # an ImmediateResponse still fits
        handler.closed = True
        handler.release("error")
        if routing:
            return [msg.immediate_response("Internal", "the endpoint picker failed to process the request")]
        return []
