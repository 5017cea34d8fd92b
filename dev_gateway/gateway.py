"""A development gateway that plays Envoy's part against the EPP, for one machine without Envoy.

Per HTTP request it opens an ext_proc stream to the EPP and does what Envoy's ext_proc filter and
router do with the replies: applies header and body mutations, honours ImmediateResponses, sends
to the first endpoint of `x-gateway-destination-endpoint` and falls back down the list when a
connection fails, reports the served endpoint in `envoy.lb` metadata, and streams the response
(SSE included) back through the EPP without buffering.

It is a development tool: production runs the EPP behind an Envoy-based Gateway (see deploy/).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import aiohttp
import grpc
from aiohttp import web
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from extproc_loadgen.envoy_flow import headers_message

DEST = "x-gateway-destination-endpoint"
SERVED = "x-gateway-destination-endpoint-served"
MODES = {"FULL_DUPLEX_STREAMED": ProcessingMode.FULL_DUPLEX_STREAMED, "BUFFERED": ProcessingMode.BUFFERED, "STREAMED": ProcessingMode.STREAMED}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization", "proxy-authenticate", "host", "content-length"}
CHUNK = 64 * 1024


@dataclass
class GatewayConfig:
    epp_address: str = "127.0.0.1:9002"
    body_mode: str = "FULL_DUPLEX_STREAMED"
    epp_tls: bool = False
    connect_timeout: float = 5.0
    upstream_timeout: float = 3600.0


def _apply_headers(headers: dict[str, str], common: pb.CommonResponse) -> None:
    for opt in common.header_mutation.set_headers:
        headers[opt.header.key.lower()] = opt.header.raw_value.decode() if opt.header.raw_value else opt.header.value
    for k in common.header_mutation.remove_headers:
        headers.pop(k.lower(), None)


class ImmediateReply(Exception):
    def __init__(self, ir: pb.ImmediateResponse) -> None:
        self.ir = ir


class DevGateway:
    def __init__(self, cfg: GatewayConfig) -> None:
        if cfg.body_mode not in MODES:
            raise ValueError(f"--body-mode must be one of {', '.join(MODES)}")
        self.cfg = cfg
        self.mode = MODES[cfg.body_mode]
        self.channel: grpc.aio.Channel | None = None
        self.stub: pb_grpc.ExternalProcessorStub | None = None
        self.session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        if self.cfg.epp_tls:
            creds = grpc.ssl_channel_credentials()
            self.channel = grpc.aio.secure_channel(self.cfg.epp_address, creds)
        else:
            self.channel = grpc.aio.insecure_channel(self.cfg.epp_address)
        self.stub = pb_grpc.ExternalProcessorStub(self.channel)
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
                                             timeout=aiohttp.ClientTimeout(total=self.cfg.upstream_timeout, connect=self.cfg.connect_timeout))

    async def _stop(self, app: web.Application) -> None:
        if self.session:
            await self.session.close()
        if self.channel:
            await self.channel.close()

    # -- one request ---------------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert self.stub is not None
        call = self.stub.Process()
        try:
            return await self._exchange(request, call)
        except ImmediateReply as e:
            ir = e.ir
            headers: dict[str, str] = {}
            _apply_headers(headers, pb.CommonResponse(header_mutation=ir.headers))
            return web.Response(status=ir.status.code or 500, body=ir.body, headers=headers)
        except grpc.aio.AioRpcError as e:
            # Envoy's failure_mode_allow=false: the request fails when the EPP is unreachable
            return web.Response(status=500, text=f"ext_proc error: {e.code().name}: {e.details()}\n")
        finally:
            call.cancel()  # no-op after a clean end; a reset when the client went away

    async def _read(self, call) -> pb.ProcessingResponse:
        r = await call.read()
        if r is grpc.aio.EOF:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "ext_proc stream ended early")
        if r.HasField("immediate_response"):
            raise ImmediateReply(r.immediate_response)
        return r

    async def _exchange(self, request: web.Request, call) -> web.StreamResponse:
        full_duplex = self.mode == ProcessingMode.FULL_DUPLEX_STREAMED
        headers = {k.lower(): v for k, v in request.headers.items()}
        pseudo = {":method": request.method, ":path": request.path_qs, ":scheme": "http", ":authority": request.host}
        body_expected = request.can_read_body
        await call.write(headers_message({**pseudo, **headers}, request=True, end_of_stream=not body_expected, mode=self.cfg.body_mode))
        body = bytearray()
        metadata: dict[str, str] = {}
        if not body_expected:
            r = await self._read(call)
            _apply_headers(headers, r.request_headers.response)
            self._take_metadata(r, metadata)
        elif full_duplex:
            async for chunk in request.content.iter_chunked(CHUNK):
                await call.write(pb.ProcessingRequest(request_body=pb.HttpBody(body=chunk, end_of_stream=False)))
            await call.write(pb.ProcessingRequest(request_body=pb.HttpBody(body=b"", end_of_stream=True)))
            while True:
                r = await self._read(call)
                self._take_metadata(r, metadata)
                if r.HasField("request_headers"):
                    _apply_headers(headers, r.request_headers.response)
                elif r.HasField("request_body"):
                    sr = r.request_body.response.body_mutation.streamed_response
                    body += sr.body
                    if sr.end_of_stream:
                        break
        else:
            r = await self._read(call)  # headers reply first
            _apply_headers(headers, r.request_headers.response)
            raw = await request.read()
            pieces = [raw] if self.mode == ProcessingMode.BUFFERED else [raw[i:i + CHUNK] for i in range(0, len(raw), CHUNK)] or [b""]
            for i, piece in enumerate(pieces):
                await call.write(pb.ProcessingRequest(request_body=pb.HttpBody(body=piece, end_of_stream=i == len(pieces) - 1)))
                r = await self._read(call)
                self._take_metadata(r, metadata)
                common = r.request_body.response
                _apply_headers(headers, common)
                bm = common.body_mutation
                kind = bm.WhichOneof("mutation")
                body += bm.body if kind == "body" else b"" if kind == "clear_body" else piece
        destinations = [d.strip() for d in (metadata.get(DEST) or headers.get(DEST, "")).split(",") if d.strip()]
        if not destinations:
            return web.Response(status=503, text="no destination endpoint from the EPP\n")
        try:
            upstream, served = await self._connect(request, destinations, headers, bytes(body) if body_expected else None)
        except web.HTTPServiceUnavailable as e:
            # As Envoy does: its local 503 reply passes the ext_proc response path, so the EPP sees the failure.
            await call.write(headers_message({":status": "503", "content-type": "text/plain"}, request=False, end_of_stream=True))
            await self._read(call)
            await call.done_writing()
            return web.Response(status=503, text=e.text)
        try:
            return await self._respond(request, call, upstream, served, full_duplex)
        finally:
            upstream.release()

    @staticmethod
    def _take_metadata(r: pb.ProcessingResponse, into: dict[str, str]) -> None:
        if r.HasField("dynamic_metadata") and "envoy.lb" in r.dynamic_metadata.fields:
            for k, v in r.dynamic_metadata.fields["envoy.lb"].struct_value.fields.items():
                into[k] = v.string_value

    async def _connect(self, request: web.Request, destinations: list[str], headers: dict[str, str], body: bytes | None):
        """The router: first endpoint, then the next on a connection failure (the destination list is the fallback order)."""
        assert self.session is not None
        out_headers = {k: v for k, v in headers.items() if k not in HOP_BY_HOP and not k.startswith(":")}
        last: Exception | None = None
        for dest in destinations:
            try:
                resp = await self.session.request(request.method, f"http://{dest}{request.path_qs}", headers=out_headers, data=body)
                return resp, dest
            except aiohttp.ClientConnectorError as e:
                last = e
        raise web.HTTPServiceUnavailable(text=f"upstream connect error or disconnect/reset before headers: every destination {destinations}: {last}\n")

    async def _respond(self, request: web.Request, call, upstream: aiohttp.ClientResponse, served: str, full_duplex: bool) -> web.StreamResponse:
        resp_headers = {k.lower(): v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
        await call.write(headers_message({":status": str(upstream.status), **resp_headers}, request=False,
                                         filter_metadata={"envoy.lb": {SERVED: served}}))
        r = await self._read(call)
        _apply_headers(resp_headers, r.response_headers.response)
        resp_headers[SERVED] = served
        out = web.StreamResponse(status=upstream.status, headers=resp_headers)
        await out.prepare(request)
        if full_duplex:
            reader = asyncio.create_task(self._pump_replies(call, out))
            try:
                async for chunk in upstream.content.iter_any():
                    await call.write(pb.ProcessingRequest(response_body=pb.HttpBody(body=chunk, end_of_stream=False)))
                await call.write(pb.ProcessingRequest(response_body=pb.HttpBody(body=b"", end_of_stream=True)))
                await reader
            finally:
                if not reader.done():
                    reader.cancel()
                    with contextlib.suppress(BaseException):
                        await reader
        else:
            chunks = [await upstream.read()] if self.mode == ProcessingMode.BUFFERED else None
            if chunks is None:
                async for chunk in upstream.content.iter_any():
                    await call.write(pb.ProcessingRequest(response_body=pb.HttpBody(body=chunk, end_of_stream=False)))
                    r = await self._read(call)
                    await self._write_body(out, r, chunk)
                await call.write(pb.ProcessingRequest(response_body=pb.HttpBody(body=b"", end_of_stream=True)))
                r = await self._read(call)
                await self._write_body(out, r, b"")
            else:
                await call.write(pb.ProcessingRequest(response_body=pb.HttpBody(body=chunks[0], end_of_stream=True)))
                r = await self._read(call)
                await self._write_body(out, r, chunks[0])
        await call.done_writing()
        await out.write_eof()
        return out

    @staticmethod
    async def _write_body(out: web.StreamResponse, r: pb.ProcessingResponse, original: bytes) -> None:
        bm = r.response_body.response.body_mutation
        kind = bm.WhichOneof("mutation")
        data = bm.body if kind == "body" else b"" if kind == "clear_body" else original
        if data:
            await out.write(data)

    async def _pump_replies(self, call, out: web.StreamResponse) -> None:
        """Full duplex: write each streamed_response chunk to the client the moment the EPP sends it."""
        while True:
            r = await self._read(call)
            if not r.HasField("response_body"):
                continue
            sr = r.response_body.response.body_mutation.streamed_response
            if sr.body:
                await out.write(sr.body)
            if sr.end_of_stream:
                return
