"""Send an arbitrary sequence of ext_proc messages on one real gRPC stream and collect the outcome.

Envoy's side is played with Envoy's message classes; unlike `EnvoyStream`, nothing here assumes
the sequence follows the protocol, so fuzz and regression tests can send anything that decodes.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc_loadgen.envoy_flow import body_messages, headers_message

REQ_HEADERS = {":method": "POST", ":path": "/v1/chat/completions", "content-type": "application/json", "x-request-id": "rid-x"}
CHAT = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'


@dataclass
class Outcome:
    replies: list[pb.ProcessingResponse] = field(default_factory=list)
    code: grpc.StatusCode | None = None
    details: str = ""

    def kinds(self) -> list[str]:
        return [r.WhichOneof("response") for r in self.replies]

    @property
    def immediate(self) -> pb.ImmediateResponse | None:
        for r in self.replies:
            if r.HasField("immediate_response"):
                return r.immediate_response
        return None


async def run_sequence(stub, messages: list[pb.ProcessingRequest], timeout: float = 5.0,
                       half_close: bool = True, until: str | None = None) -> Outcome:
    """Write every message, half-close (as Envoy does at the end of an exchange), read to the end.

    `until`: stop at the first reply of that kind and hang up (Envoy going on with the response).
    """
    call = stub.Process()
    out = Outcome()

    async def writer() -> None:
        for m in messages:
            try:
                await call.write(m)
            except Exception:
                return  # the server ended the stream early
        if half_close:
            with contextlib.suppress(Exception):
                await call.done_writing()

    w = asyncio.create_task(writer())
    try:
        async with asyncio.timeout(timeout):
            while True:
                r = await call.read()
                if r is grpc.aio.EOF:
                    break
                out.replies.append(r)
                if until is not None and r.WhichOneof("response") == until:
                    call.cancel()
                    break
    except grpc.aio.AioRpcError:
        pass
    except TimeoutError:
        call.cancel()  # the stream stays open (Envoy would go on with the response): hang up as Envoy's reset
    finally:
        w.cancel()
        with contextlib.suppress(BaseException):
            await w
    out.code = await call.code()
    out.details = await call.details() or ""
    return out


def request_headers(headers: dict[str, str] | None = None, eos: bool = False, mode: str | None = None) -> pb.ProcessingRequest:
    return headers_message(headers or REQ_HEADERS, end_of_stream=eos, mode=mode)


def request_body(body: bytes = CHAT, eos: bool = True) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=eos))


def request_trailers() -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_trailers=pb.HttpTrailers())


def response_headers(status: str = "200", eos: bool = False, content_type: str = "application/json") -> pb.ProcessingRequest:
    return headers_message({":status": status, "content-type": content_type}, request=False, end_of_stream=eos)


def response_body(body: bytes = b'{"usage":{"prompt_tokens":3,"completion_tokens":2}}', eos: bool = True) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=body, end_of_stream=eos))


def response_trailers() -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_trailers=pb.HttpTrailers())


def full_exchange(body: bytes = CHAT, headers: dict[str, str] | None = None) -> list[pb.ProcessingRequest]:
    return [request_headers(headers), *body_messages(body, 16384), response_headers(), response_body()]


def no_request_state(epp) -> bool:
    """Nothing a request holds survives: in-flight table, running gauge, scorer counts, body budget."""
    running = sum(s.running.value for s in epp.metrics.request_series())
    counts = getattr(epp.built.plugins.get("active-request-scorer"), "counts", {})
    return not epp.director.inflight and running == 0 and not counts and epp.processor.budget.held == 0
