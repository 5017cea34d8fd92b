"""Envoy's side of one ext_proc stream, for each body mode, with Envoy's real message classes.

FULL_DUPLEX_STREAMED: headers and body chunks go out without waiting; replies come back in
order (headers, then streamed body chunks). BUFFERED: headers, wait; whole body, wait.
STREAMED: headers, wait; each chunk, wait for its reply. The response path mirrors it.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import grpc
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue, Metadata
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf.struct_pb2 import Struct

MODES = {
    "FULL_DUPLEX_STREAMED": ProcessingMode.FULL_DUPLEX_STREAMED,
    "BUFFERED": ProcessingMode.BUFFERED,
    "STREAMED": ProcessingMode.STREAMED,
}


def headers_message(headers: dict[str, str], *, end_of_stream: bool = False, request: bool = True,
                    mode: str | None = None, response_mode: str | None = None, subset: Sequence[str] | None = None,
                    filter_metadata: dict[str, dict[str, Any]] | None = None) -> pb.ProcessingRequest:
    """A request_headers (or response_headers) message as Envoy sends it.

    `mode` is announced in `protocol_config` (for the response too unless `response_mode`); `subset` becomes the `envoy.lb.subset_hint`;
    `filter_metadata` adds namespaces to `metadata_context` (e.g. the served endpoint).
    """
    hm = pb.HttpHeaders(
        headers=HeaderMap(headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()]),
        end_of_stream=end_of_stream,
    )
    req = pb.ProcessingRequest(request_headers=hm) if request else pb.ProcessingRequest(response_headers=hm)
    if mode is not None:
        m = MODES[mode]
        rm = MODES[response_mode or mode]
        req.protocol_config.CopyFrom(pb.ProtocolConfiguration(request_body_mode=m, response_body_mode=rm))
    namespaces = dict(filter_metadata or {})
    if subset is not None:
        namespaces["envoy.lb.subset_hint"] = {"x-gateway-destination-endpoint-subset": list(subset)}
    if namespaces:
        structs = {}
        for ns, values in namespaces.items():
            structs[ns] = Struct()
            structs[ns].update(values)
        req.metadata_context.CopyFrom(Metadata(filter_metadata=structs))
    return req


def body_messages(body: bytes, chunk: int, *, request: bool = True) -> list[pb.ProcessingRequest]:
    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    out = []
    for i, p in enumerate(pieces):
        hb = pb.HttpBody(body=p, end_of_stream=i == len(pieces) - 1)
        out.append(pb.ProcessingRequest(request_body=hb) if request else pb.ProcessingRequest(response_body=hb))
    return out


@dataclass
class FlowResult:
    """What Envoy would have applied: routing, mutated body, immediate response, response bytes."""

    header_reply: pb.ProcessingResponse | None = None
    routing_headers: dict[str, str] = field(default_factory=dict)
    removed_headers: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    clear_route_cache: bool = False
    body: bytes = b""
    body_chunks: list[int] = field(default_factory=list)
    immediate: pb.ImmediateResponse | None = None
    response_body: bytes = b""
    replies: int = 0

    @property
    def destination(self) -> str | None:
        return self.routing_headers.get("x-gateway-destination-endpoint")


def _apply_common(res: FlowResult, common: pb.CommonResponse) -> None:
    for h in common.header_mutation.set_headers:
        res.routing_headers[h.header.key] = h.header.raw_value.decode() or h.header.value
    res.removed_headers.extend(common.header_mutation.remove_headers)
    res.clear_route_cache |= common.clear_route_cache


def _apply_body(res: FlowResult, common: pb.CommonResponse, original: bytes, request: bool) -> bool:
    """Apply a body mutation; True when the body is complete (EoS)."""
    bm = common.body_mutation
    kind = bm.WhichOneof("mutation")
    target = "body" if request else "response_body"
    if kind == "streamed_response":
        setattr(res, target, getattr(res, target) + bm.streamed_response.body)
        res.body_chunks.append(len(bm.streamed_response.body))
        return bm.streamed_response.end_of_stream
    if kind == "body":  # replaces the chunk it answers (the whole body in BUFFERED mode)
        setattr(res, target, getattr(res, target) + bm.body)
    elif kind == "clear_body":
        pass
    else:
        setattr(res, target, getattr(res, target) + original)
    return False


class EnvoyStream:
    """One HTTP request's ext_proc stream, driven like Envoy drives it."""

    def __init__(self, stub: pb_grpc.ExternalProcessorStub, mode: str = "FULL_DUPLEX_STREAMED", response_mode: str | None = None) -> None:
        self.stub, self.mode, self.response_mode = stub, mode, response_mode or mode
        self.call = stub.Process()
        self.res = FlowResult()

    async def _read(self) -> pb.ProcessingResponse | None:
        try:
            r = await self.call.read()
        except grpc.aio.AioRpcError:
            return None
        if r is grpc.aio.EOF:
            return None
        self.res.replies += 1
        if r.HasField("immediate_response"):
            self.res.immediate = r.immediate_response
        if r.HasField("dynamic_metadata"):
            for ns, value in r.dynamic_metadata.fields.items():
                self.res.metadata[ns] = {k: v.string_value for k, v in value.struct_value.fields.items()}
        return r

    async def send_request(self, headers: dict[str, str], body: bytes | None, chunk: int = 16384,
                           subset: Sequence[str] | None = None, send_mode: bool = True) -> FlowResult:
        res, call = self.res, self.call
        mode = self.mode if send_mode else None
        await call.write(headers_message(headers, end_of_stream=body is None, mode=mode, response_mode=self.response_mode if mode else None,
                                         subset=subset))
        if body is None:
            r = await self._read()
            if r is not None and r.HasField("request_headers"):
                res.header_reply = r
                _apply_common(res, r.request_headers.response)
            return res
        chunks = body_messages(body, chunk)
        if self.mode == "FULL_DUPLEX_STREAMED":
            # Envoy writes body chunks as they arrive and reads replies at the same time.
            writer = asyncio.create_task(self._write_all(chunks))
            try:
                while True:
                    r = await self._read()
                    if r is None or res.immediate is not None:
                        return res
                    if r.HasField("request_headers"):
                        res.header_reply = r
                        _apply_common(res, r.request_headers.response)
                    elif r.HasField("request_body"):
                        if _apply_body(res, r.request_body.response, b"", True):
                            return res
            finally:
                if not writer.done():
                    writer.cancel()
                with contextlib.suppress(BaseException):
                    await writer
        r = await self._read()  # BUFFERED / STREAMED: the headers reply comes first
        if r is None or res.immediate is not None:
            return res
        res.header_reply = r
        _apply_common(res, r.request_headers.response)
        if self.mode == "BUFFERED":
            chunks = body_messages(body, len(body) or 1)
        for m in chunks:
            await call.write(m)
            r = await self._read()
            if r is None or res.immediate is not None:
                return res
            _apply_common(res, r.request_body.response)
            _apply_body(res, r.request_body.response, m.request_body.body, True)
        return res

    async def _write_all(self, messages: Sequence[pb.ProcessingRequest]) -> None:
        for m in messages:
            try:
                await self.call.write(m)
            except Exception:
                return  # the server ended the stream early (an ImmediateResponse is on its way)

    async def send_response(self, status: int, body_chunks: Sequence[bytes], content_type: str = "application/json") -> FlowResult:
        res, call = self.res, self.call
        await call.write(headers_message({":status": str(status), "content-type": content_type}, request=False,
                                         end_of_stream=not body_chunks))
        await self._read()
        if not body_chunks:
            return res
        if self.response_mode == "BUFFERED":
            body_chunks = [b"".join(body_chunks)]
        for i, c in enumerate(body_chunks):
            eos = i == len(body_chunks) - 1
            await call.write(pb.ProcessingRequest(response_body=pb.HttpBody(body=c, end_of_stream=eos)))
            if self.response_mode != "FULL_DUPLEX_STREAMED":
                r = await self._read()
                if r is not None:
                    _apply_body(res, r.response_body.response, c, False)
        if self.response_mode == "FULL_DUPLEX_STREAMED":
            while True:
                r = await self._read()
                if r is None or (r.HasField("response_body") and _apply_body(res, r.response_body.response, b"", False)):
                    break
        return res

    async def close(self) -> None:
        await self.call.done_writing()
        while await self.call.read() is not grpc.aio.EOF:
            pass

    def cancel(self) -> None:
        self.call.cancel()
