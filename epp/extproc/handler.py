"""One ext_proc stream = one HTTP request through Envoy: a small state machine per stream.

Request path: headers → body chunks (accumulated to end_of_stream) → schedule → reply. In
FULL_DUPLEX_STREAMED mode (GIE's default) the headers reply is deferred until the body is
scheduled, then sent before the body, which is re-emitted in ≤62,000-byte chunks. In BUFFERED
mode (Envoy says which in `protocol_config`) Envoy waits for the headers reply first and holds
the request until the body reply, so the headers reply is a CONTINUE that strips client-set
routing headers and the routing mutation rides on the body reply. In STREAMED mode Envoy picks
the upstream as soon as the headers reply arrives, before the body exists to schedule on, so a
request with a body is refused at its first message; headers-only requests route as in GIE.

Response path: status and content type from the headers, usage from the JSON body or from SSE
`data:` lines, the client's model name restored when it was rewritten, and the request's state
released at the end, on trailers, on cancel/reset, or by the director's timeout.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.extproc import messages as msg
from epp.extproc.director import Director, InFlight
from epp.extproc.request_parser import api_of, parse_request
from epp.scheduling.framework import SchedulingError

SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
MODEL_REWRITE_HEADER = "x-gateway-model-name-rewrite"
# Headers a client must never set for the upstream: the EPP alone chooses endpoints.
CLIENT_FORBIDDEN = (
    "x-gateway-destination-endpoint",
    "x-gateway-destination-endpoint-served",
    "x-gateway-destination-endpoint-subset",
    "x-prefiller-host-port",
    "x-prefiller-url",
)
SYSTEM_OWNED = frozenset(
    {
        "x-gateway-inference-fairness-id",
        "x-gateway-inference-objective",
        MODEL_REWRITE_HEADER,
        *CLIENT_FORBIDDEN,
        "content-length",
    }
)

# Methods that carry an inference request's body; a headers-only one to an inference path is a client error.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
STREAMED_REFUSED = SchedulingError(
    "Internal",
    "the gateway sends the request body in ext_proc mode STREAMED, where Envoy picks the upstream before the body "
    "reaches the endpoint picker; configure request_body_mode FULL_DUPLEX_STREAMED (or BUFFERED) in the ext_proc filter",
)

_FULL_DUPLEX = ProcessingMode.FULL_DUPLEX_STREAMED
_BUFFERED = ProcessingMode.BUFFERED
_STREAMED = ProcessingMode.STREAMED


def _headers_of(hm: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in hm.headers:
        raw = h.raw_value
        out[h.key.lower()] = raw.decode("utf-8", "replace") if raw else h.value
    return out


def _subset_of(req: pb.ProcessingRequest) -> list[str] | None:
    fm = req.metadata_context.filter_metadata
    if SUBSET_NAMESPACE not in fm:
        return None
    fields = fm[SUBSET_NAMESPACE].fields
    if SUBSET_KEY not in fields:
        return None
    value = fields[SUBSET_KEY]
    kind = value.WhichOneof("kind")
    if kind == "list_value":
        return [v.string_value.strip() for v in value.list_value.values if v.string_value]
    if kind == "string_value":
        return [s.strip() for s in value.string_value.split(",") if s.strip()]
    return []


class StreamHandler:
    """Protocol state of one ext_proc stream. `handle()` returns the replies for one message."""

    __slots__ = (
        "director", "max_body", "headers", "path", "request_id", "generated_id", "subset", "request_mode",
        "response_mode", "deferred", "body", "body_len", "rejected", "flight", "response_streaming",
        "response_buffer", "sse_tail", "model_from", "model_to", "done",
    )

    def __init__(self, director: Director, max_body: int) -> None:
        self.director = director
        self.max_body = max_body
        self.headers: dict[str, str] = {}
        self.path = ""
        self.request_id = ""
        self.generated_id = False
        self.subset: list[str] | None = None
        self.request_mode = _FULL_DUPLEX
        self.response_mode = _FULL_DUPLEX
        self.deferred = True  # headers reply waits for the body (full duplex)
        self.body: list[bytes] = []
        self.body_len = 0
        self.rejected = False  # an ImmediateResponse was sent; ignore the rest of the stream
        self.flight: InFlight | None = None
        self.response_streaming = False
        self.response_buffer: list[bytes] = []
        self.sse_tail = b""
        self.model_from: bytes | None = None
        self.model_to: bytes | None = None
        self.done = False

    # -- dispatch -------------------------------------------------------------------------------
    def handle(self, req: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        if self.rejected:
            return []
        kind = req.WhichOneof("request")
        if kind == "request_headers":
            return self._request_headers(req)
        if kind == "request_body":
            return self._request_body(req.request_body)
        if kind == "response_headers":
            return self._response_headers(req.response_headers)
        if kind == "response_body":
            return self._response_body(req.response_body)
        if kind == "response_trailers":
            self.finish("success" if 0 < (self.flight.status if self.flight else 200) < 400 else "error")
            return [msg.trailers_response(request=False)]
        if kind == "request_trailers":
            return []  # GIE sends no reply for request trailers
        return []

    def _reject(self, error: SchedulingError, request: Any = None, log: bool = True) -> list[pb.ProcessingResponse]:
        if log:
            self.director.fail(request, error)
        self.rejected = True
        self.finish("error")
        return [msg.immediate_response(error.code, error.message)]

    # -- request path -----------------------------------------------------------------------------
    def _request_headers(self, req: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        if req.HasField("protocol_config"):
            pc = req.protocol_config
            self.request_mode = pc.request_body_mode or _FULL_DUPLEX
            self.response_mode = pc.response_body_mode or _FULL_DUPLEX
            self.deferred = self.request_mode == _FULL_DUPLEX
        hm = req.request_headers
        self.headers = headers = _headers_of(hm.headers)
        self.path = headers.get(":path", "")
        rid = headers.get("x-request-id")
        if not rid:
            rid = str(uuid.uuid4())
            headers["x-request-id"] = rid
            self.generated_id = True
        self.request_id = rid
        self.subset = _subset_of(req)
        if hm.end_of_stream:
            if headers.get(":method", "POST") in BODY_METHODS and api_of(self.path):
                return self._schedule(b"")  # an inference call without a body: the parser's clear 400
            try:
                ep = self.director.pick_for_headers_only(self.subset)
            except SchedulingError as e:
                return self._reject(e)
            return [self._routing_headers_reply(ep.hostport, 0)]
        if self.request_mode == _STREAMED:
            return self._reject(STREAMED_REFUSED)
        if not self.deferred:
            # BUFFERED: Envoy waits for this reply, then for the body reply before routing.
            return [msg.request_headers_response(remove=self._forbidden_present(keep_destination=False))]
        return []

    def _request_body(self, b: pb.HttpBody) -> list[pb.ProcessingResponse]:
        chunk = b.body
        if chunk:
            self.body_len += len(chunk)
            if self.body_len > self.max_body:
                self.body.clear()
                err = SchedulingError("PayloadTooLarge", f"request body exceeds the limit of {self.max_body} bytes")
                return self._reject(err)
            self.body.append(chunk)
        if not b.end_of_stream:
            return []
        raw = b"".join(self.body)
        self.body.clear()
        return self._schedule(raw)

    def _schedule(self, raw: bytes) -> list[pb.ProcessingResponse]:
        request = None
        try:
            request, _ = parse_request(self.request_id, self.path, self.headers, raw, self.headers.get(MODEL_REWRITE_HEADER))
            self.flight = self.director.schedule(request, self.subset)
        except SchedulingError as e:
            return self._reject(e, request, log=request is None or e.code == "BadRequest")
        if request.target_model != request.model:
            raw = _rewrite_model(raw, request.target_model)
            self.model_from = _model_literal(request.target_model)
            self.model_to = _model_literal(request.model)
        destination = ",".join(e.hostport for e in self.flight.result.targets)
        self.response_streaming = request.stream
        if self.deferred:
            out = [self._routing_headers_reply(destination, len(raw))]
            out.extend(msg.streamed_chunks(raw, request=True))
            return out
        set_headers = self._routing_headers(destination, len(raw))
        return [
            msg.body_response(
                request=True,
                body=raw,
                set_headers=set_headers,
                remove=self._forbidden_present(),
                clear_route_cache=True,
                metadata=msg.destination_metadata(destination),
            )
        ]

    def _routing_headers(self, destination: str, body_len: int) -> dict[str, str]:
        h = {msg.DESTINATION_HEADER: destination}
        if body_len:
            h["content-length"] = str(body_len)
        if self.generated_id:
            h["x-request-id"] = self.request_id
        return h

    def _forbidden_present(self, keep_destination: bool = True) -> list[str]:
        """Client-set routing headers to remove; the destination is kept only where the same reply overwrites it."""
        return [k for k in CLIENT_FORBIDDEN if k in self.headers and not (keep_destination and k == msg.DESTINATION_HEADER)]

    def _routing_headers_reply(self, destination: str, body_len: int) -> pb.ProcessingResponse:
        return msg.request_headers_response(
            self._routing_headers(destination, body_len),
            self._forbidden_present(),
            clear_route_cache=True,
            metadata=msg.destination_metadata(destination),
        )

    # -- response path ------------------------------------------------------------------------------
    def _response_headers(self, hm: pb.HttpHeaders) -> list[pb.ProcessingResponse]:
        headers = _headers_of(hm.headers)
        status = headers.get(":status") or headers.get("status") or "200"
        if self.flight is not None:
            self.flight.status = int(status) if status.isdigit() else 0
        if "text/event-stream" in headers.get("content-type", ""):
            self.response_streaming = True
        reply = msg.response_headers_response({"x-went-into-resp-headers": "true"})
        if hm.end_of_stream:
            self.finish("success" if self.flight is None or self.flight.status < 400 else "error")
        return [reply]

    def _response_body(self, b: pb.HttpBody) -> list[pb.ProcessingResponse]:
        chunk = b.body
        flight = self.flight
        if flight is not None:
            flight.response_bytes += len(chunk)
        eos = b.end_of_stream
        if self.response_streaming:
            self._scan_sse(chunk, eos)
            if self.model_from:
                chunk = chunk.replace(self.model_from, self.model_to)  # type: ignore[arg-type]
            out = self._emit_response_chunk(chunk, eos, rewritten=self.model_from is not None)
        else:
            self.response_buffer.append(chunk)
            if not eos:
                if self.response_mode == _FULL_DUPLEX:
                    return []
                return [msg.body_response(request=False, clear_body=self.response_mode == _STREAMED)]
            whole = b"".join(self.response_buffer)
            self.response_buffer.clear()
            self._usage_from_json(whole)
            if self.model_from:
                whole = _restore_model(whole, self.model_from, self.model_to)  # type: ignore[arg-type]
            if self.response_mode == _FULL_DUPLEX:
                out = list(msg.streamed_chunks(whole, request=False))
            else:
                out = [msg.body_response(request=False, body=whole if (self.model_from or self.response_mode == _STREAMED) else None)]
        if eos:
            ok = flight is None or 0 < flight.status < 400 or flight.status == 0
            self.finish("success" if ok else "error")
        return out

    def _emit_response_chunk(self, chunk: bytes, eos: bool, rewritten: bool) -> list[pb.ProcessingResponse]:
        if self.response_mode == _FULL_DUPLEX:
            return list(msg.streamed_chunks(chunk, request=False, end_of_stream=eos))
        return [msg.body_response(request=False, body=chunk if rewritten else None)]

    def _scan_sse(self, chunk: bytes, eos: bool) -> None:
        """Usage from the SSE `data:` line that carries it (vLLM sends it in the last data event)."""
        if self.flight is None:
            return
        data = self.sse_tail + chunk
        if b"usage" not in data:
            self.sse_tail = data[-64:] if not eos else b""
            return
        lines = data.split(b"\n")
        self.sse_tail = b"" if eos else lines.pop()
        for line in lines:
            if line.startswith(b"data:") and b'"usage"' in line:
                try:
                    self._take_usage(orjson.loads(line[5:].strip()))
                except orjson.JSONDecodeError:
                    continue

    def _usage_from_json(self, body: bytes) -> None:
        if self.flight is None or b"usage" not in body:
            return
        try:
            self._take_usage(orjson.loads(body))
        except orjson.JSONDecodeError:
            pass

    def _take_usage(self, obj: Any) -> None:
        usage = obj.get("usage") if isinstance(obj, dict) else None
        if isinstance(usage, dict) and self.flight is not None:
            self.flight.input_tokens = usage.get("prompt_tokens", self.flight.input_tokens)
            self.flight.output_tokens = usage.get("completion_tokens", self.flight.output_tokens)

    # -- end --------------------------------------------------------------------------------------
    def finish(self, outcome: str) -> None:
        """Release the request's state; idempotent (normal end, cancel, reset, timeout)."""
        self.done = True
        if self.flight is not None:
            self.director.complete(self.flight, outcome)


def _model_literal(model: str) -> bytes:
    return b'"model":' + orjson.dumps(model)


def _rewrite_model(raw: bytes, target: str) -> bytes:
    body = orjson.loads(raw)
    body["model"] = target
    return orjson.dumps(body)


def _restore_model(body: bytes, model_from: bytes, model_to: bytes) -> bytes:
    spaced_from = model_from.replace(b'":', b'": ', 1)
    return body.replace(model_from, model_to).replace(spaced_from, model_to)

