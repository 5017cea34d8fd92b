"""One ext_proc stream = one HTTP request through Envoy: a small state machine per stream.

Phases: idle → request body → routed → response → done. Request path: headers → body chunks
(accumulated to end_of_stream, or to request trailers) → schedule → reply. In
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

A message out of protocol order (a second request on the stream, a body before headers, …) ends
the stream cleanly after releasing everything the request holds; Envoy never sends one.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import orjson
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.extproc import messages as msg
from epp.extproc.body_budget import BodyBudget
from epp.extproc.director import Director, InFlight
from epp.endpoint_health.outcomes import stream_error_status
from epp.extproc.request_parser import api_of
from epp.observability.logging import get_logger
from epp.scheduling.framework import LLMRequest, SchedulingError

log = get_logger("epp.extproc")

SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
MODEL_REWRITE_HEADERS = ("x-llm-d-model-name-rewrite", "x-gateway-model-name-rewrite")
# Request headers the EPP owns: whatever a client sent under these names never reaches the
# upstream (removed, or overwritten when the EPP sets them). Destination and prefill addresses
# are chosen by the EPP alone; rewrite/objective/fairness are inputs to the EPP, not to the model
# server. The rewrite header is honoured only with `--trust-model-rewrite-header` (a gateway
# filter in front of ext_proc sets it and strips the client's).
CLIENT_FORBIDDEN = (
    "x-gateway-destination-endpoint",
    "x-gateway-destination-endpoint-served",
    "x-gateway-destination-endpoint-subset",
    "x-prefiller-host-port",
    "x-prefiller-url",
    *MODEL_REWRITE_HEADERS,
    "x-gateway-inference-objective",
    "x-llm-d-inference-objective",
    "x-gateway-inference-fairness-id",
    "x-llm-d-inference-fairness-id",
    "x-encoder-hosts-ports",
    "x-data-parallel-host-port",
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

# Stream phases.
IDLE, REQUEST_BODY, ROUTED, RESPONSE, DONE = "idle", "request_body", "routed", "response", "done"
_JSON_USAGE = re.compile(rb'"usage"\s*:\s*(\{(?:[^{}]|\{[^{}]*\})*\})')


def _status_code(value: str) -> int:
    """The HTTP status of a `:status` header; 0 when it is not a 3-digit ASCII number."""
    if len(value) == 3 and value.isascii() and value.isdigit():
        return int(value)
    return 0


def _token_count(value: Any, default: int | None) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 31:
        return value
    return default


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
        "director", "max_body", "budget", "trust_rewrite", "headers", "path", "request_id", "generated_id", "subset",
        "request_mode", "response_mode", "deferred", "body", "body_len", "held", "rejected", "closed", "phase", "flight",
        "response_streaming", "response_buffer", "response_held", "sse_tail", "model_from", "model_to", "done", "waiting",
    )

    def __init__(self, director: Director, max_body: int, budget: BodyBudget | None = None,
                 trust_rewrite: bool = False) -> None:
        self.director = director
        self.max_body = max_body
        self.budget = budget if budget is not None else BodyBudget(0)
        self.trust_rewrite = trust_rewrite
        self.headers: dict[str, str] = {}
        self.path = ""
        self.request_id = ""
        self.generated_id = False
        self.subset: list[str] | None = None
        self.request_mode = _FULL_DUPLEX
        self.response_mode = _FULL_DUPLEX
        self.deferred = True  # headers reply waits for the body (full duplex)
        self.body = bytearray()  # one growing buffer: no per-chunk objects, mapped whole when large
        self.body_len = 0
        self.held = 0  # bytes reserved from the shared body budget
        self.rejected = False  # an ImmediateResponse was sent; the stream ends
        self.closed = False  # a protocol violation ended the stream
        self.phase = IDLE
        self.flight: InFlight | None = None
        self.response_streaming = False
        self.response_buffer: list[bytes] = []
        self.response_held = 0
        self.sse_tail = b""
        self.model_from: bytes | None = None
        self.model_to: bytes | None = None
        self.done = False
        self.waiting: tuple[Any, LLMRequest, bytes, bool] | None = None  # admitted later by flow control: see resume()

    @property
    def ended(self) -> bool:
        """True once the stream must end (after an ImmediateResponse or a protocol violation)."""
        return self.rejected or self.closed

    # -- dispatch -------------------------------------------------------------------------------
    def handle(self, req: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        if self.ended:
            return []
        kind = req.WhichOneof("request")
        phase = self.phase
        if kind == "request_headers":
            if phase != IDLE:
                return self._violation(kind)
            return self._request_headers(req)
        if kind == "request_body":
            if phase != REQUEST_BODY:
                return self._violation(kind)
            return self._request_body(req.request_body)
        if kind == "request_trailers":
            if phase == IDLE:
                return self._violation(kind)
            if phase == REQUEST_BODY:
                return self._request_trailers()
            return [msg.trailers_response(request=True)]
        if kind in ("response_headers", "response_body", "response_trailers"):
            if phase == REQUEST_BODY:
                # Envoy replied to the client itself before the body was complete (its 413 when a BUFFERED
                # body outgrows its buffer): drop what was held and answer, or Envoy waits for message_timeout.
                self._drop_body()
            if phase in (IDLE, ROUTED, REQUEST_BODY):
                self.phase = RESPONSE
            if kind == "response_headers":
                return self._response_headers(req.response_headers)
            if kind == "response_body":
                return self._response_body(req.response_body)
            out = self._release_held(end_of_stream=False)  # trailers end a body sent without end_of_stream
            self.finish("success" if self.flight is None or 0 < self.flight.status < 400 or self.flight.status == 0 else "error")
            out.append(msg.trailers_response(request=False))
            return out
        return self._violation(kind or "empty")

    def _violation(self, kind: str) -> list[pb.ProcessingResponse]:
        """Out-of-order message: release the request's state and end the stream cleanly."""
        log.warning("ext_proc protocol violation; closing the stream", request_id=self.request_id or None,
                    message=kind, phase=self.phase)
        self.closed = True
        self.release("cancelled")
        return []

    def _reject(self, error: SchedulingError, request: Any = None, log: bool = True) -> list[pb.ProcessingResponse]:
        if log:
            self.director.fail(request, error)
        self.rejected = True
        self.release("error")
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
            self.phase = ROUTED
            if headers.get(":method", "POST") in BODY_METHODS and api_of(self.path):
                return self._schedule(b"")  # an inference call without a body: the parser's clear 400
            try:
                ep = self.director.pick_for_headers_only(self.subset)
            except SchedulingError as e:
                return self._reject(e)
            return [self._routing_headers_reply(ep.hostport, 0)]
        if self.request_mode == _STREAMED:
            return self._reject(STREAMED_REFUSED)
        self.phase = REQUEST_BODY
        if not self.deferred:
            # BUFFERED: Envoy waits for this reply, then for the body reply before routing.
            return [msg.request_headers_response(remove=self._forbidden_present(keep_destination=False))]
        return []

    def _request_body(self, b: pb.HttpBody) -> list[pb.ProcessingResponse]:
        chunk = b.body
        if chunk:
            n = len(chunk)
            self.body_len += n
            if self.body_len > self.max_body:
                self._drop_body()
                err = SchedulingError("PayloadTooLarge", f"request body exceeds the limit of {self.max_body} bytes")
                return self._reject(err)
            if not self.budget.reserve(n):
                self._drop_body()
                err = SchedulingError(
                    "ResourceExhausted",
                    f"request bodies held by the EPP would exceed its buffer budget of {self.budget.limit} bytes; retry later",
                )
                return self._reject(err)
            self.held += n
            self.body += chunk
        if not b.end_of_stream:
            if self.request_mode == _BUFFERED:
                return self._body_complete(end_of_stream=False)  # the whole body, trailers follow
            return []
        return self._body_complete(end_of_stream=True)

    def _request_trailers(self) -> list[pb.ProcessingResponse]:
        """Trailers end a body sent without end_of_stream: route it, then answer the trailers."""
        out = self._body_complete(end_of_stream=False)
        if not self.rejected:
            out.append(msg.trailers_response(request=True))
        return out

    def _body_complete(self, end_of_stream: bool) -> list[pb.ProcessingResponse]:
        raw = bytes(self.body)
        self.body = bytearray()
        self.phase = ROUTED
        try:
            return self._schedule(raw, end_of_stream)
        finally:
            self._drop_body()

    def _drop_body(self) -> None:
        if self.body:
            self.body = bytearray()
        if self.held:
            self.budget.release(self.held)
            self.held = 0

    def _model_rewrite(self) -> str | None:
        if not self.trust_rewrite:
            return None
        for name in MODEL_REWRITE_HEADERS:
            value = self.headers.get(name)
            if value:
                return value
        return None

    def _schedule(self, raw: bytes, end_of_stream: bool = True) -> list[pb.ProcessingResponse]:
        request = None
        try:
            request = self.director.parse_request(self.request_id, self.path, self.headers, raw, self._model_rewrite())
            waiting = self.director.admit(request, self.subset)
        except SchedulingError as e:
            return self._reject(e, request, log=request is None or e.code == "BadRequest")
        if waiting is not None:
            # Flow control holds the request: the service awaits resume() before reading on.
            self.waiting = (waiting, request, raw, end_of_stream)
            return []
        return self._route(request, raw, end_of_stream)

    async def resume(self) -> list[pb.ProcessingResponse]:
        """Wait for flow control to dispatch the request, then route it as usual."""
        assert self.waiting is not None
        waiting, request, raw, end_of_stream = self.waiting
        self.waiting = None
        try:
            await waiting
        except SchedulingError as e:
            return self._reject(e, request, log=False)
        out = self._route(request, raw, end_of_stream)
        if not end_of_stream and not self.rejected:
            out.append(msg.trailers_response(request=True))  # the trailers that ended the body, answered after it
        return out

    def _route(self, request: LLMRequest, raw: bytes, end_of_stream: bool) -> list[pb.ProcessingResponse]:
        try:
            self.flight = self.director.schedule(request, self.subset)
        except SchedulingError as e:
            return self._reject(e, request, log=e.code == "BadRequest")
        request.body = None  # the parsed body is not kept past PreRequest: it can be many times the raw size
        if request.target_model != request.model:
            raw = _rewrite_model(raw, request.target_model)
            self.model_from = _model_literal(request.target_model)
            self.model_to = _model_literal(request.model)
        destination = ",".join(e.hostport for e in self.flight.result.targets)
        scores = self.flight.endpoint_scores
        self.response_streaming = request.stream
        if self.deferred:
            out = [self._routing_headers_reply(destination, len(raw), scores)]
            out.extend(msg.streamed_chunks(raw, request=True, end_of_stream=end_of_stream))
            return out
        set_headers = self._routing_headers(destination, len(raw))
        return [
            msg.body_response(
                request=True,
                body=raw,
                set_headers=set_headers,
                remove=self._forbidden_present(),
                clear_route_cache=True,
                metadata=msg.destination_metadata(destination, scores),
            )
        ]

    def _routing_headers(self, destination: str, body_len: int) -> dict[str, str]:
        extra = self.flight.result.request_headers if self.flight is not None and self.flight.result is not None else None
        h = {**extra, msg.DESTINATION_HEADER: destination} if extra else {msg.DESTINATION_HEADER: destination}  # e.g. x-prefiller-host-port
        if body_len:
            h["content-length"] = str(body_len)
        if self.generated_id:
            h["x-request-id"] = self.request_id
        return h

    def _forbidden_present(self, keep_destination: bool = True) -> list[str]:
        """Client-set routing headers to remove; the destination is kept only where the same reply overwrites it."""
        return [k for k in CLIENT_FORBIDDEN if k in self.headers and not (keep_destination and k == msg.DESTINATION_HEADER)]

    def _routing_headers_reply(self, destination: str, body_len: int, scores: dict[str, float] | None = None) -> pb.ProcessingResponse:
        return msg.request_headers_response(
            self._routing_headers(destination, body_len),
            self._forbidden_present(),
            clear_route_cache=True,
            metadata=msg.destination_metadata(destination, scores),
        )

    # -- response path ------------------------------------------------------------------------------
    def _response_headers(self, hm: pb.HttpHeaders) -> list[pb.ProcessingResponse]:
        headers = _headers_of(hm.headers)
        status = headers.get(":status") or headers.get("status") or "200"
        if self.flight is not None:
            self.flight.status = _status_code(status)
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
        if not self.response_streaming and (self.response_mode == _STREAMED
                                            or self.response_held + len(chunk) > self.max_body):
            # STREAMED answers chunk by chunk (a withheld body could not follow trailers), and a JSON
            # body too large to hold is not held: both pass through from here, usage read from the tail.
            out = self._release_held(end_of_stream=False)
            self.response_streaming = True
        else:
            out = []
        if self.response_streaming:
            self._scan_usage(chunk, eos)
            if self.model_from:
                chunk = chunk.replace(self.model_from, self.model_to)  # type: ignore[arg-type]
            out.extend(self._emit_response_chunk(chunk, eos, rewritten=self.model_from is not None))
        else:
            self.response_buffer.append(chunk)
            self.response_held += len(chunk)
            if not eos and self.response_mode != _BUFFERED:  # BUFFERED sends the whole body in one message
                return []
            out = self._release_held(end_of_stream=eos)
        if eos:
            ok = flight is None or 0 < flight.status < 400 or flight.status == 0
            self.finish("success" if ok else "error")
        return out

    def _release_held(self, end_of_stream: bool) -> list[pb.ProcessingResponse]:
        """The held JSON response body, usage read and the client's model name restored, as replies."""
        if not self.response_buffer and not (end_of_stream and self.response_mode == _FULL_DUPLEX):
            return []
        whole = b"".join(self.response_buffer)
        self.response_buffer.clear()
        self.response_held = 0
        self._usage_from_json(whole)
        if self.model_from:
            whole = _restore_model(whole, self.model_from, self.model_to)  # type: ignore[arg-type]
        if self.response_mode == _FULL_DUPLEX:
            return list(msg.streamed_chunks(whole, request=False, end_of_stream=end_of_stream))
        return [msg.body_response(request=False, body=whole if self.model_from else None)]

    def _emit_response_chunk(self, chunk: bytes, eos: bool, rewritten: bool) -> list[pb.ProcessingResponse]:
        if self.response_mode == _FULL_DUPLEX:
            return list(msg.streamed_chunks(chunk, request=False, end_of_stream=eos))
        return [msg.body_response(request=False, body=chunk if rewritten else None)]

    def _scan_usage(self, chunk: bytes, eos: bool) -> None:
        """Usage from a body passed through: the SSE `data:` line that carries it (vLLM sends it in the
        last event), or the `"usage": {…}` object near the end of a JSON body."""
        if self.flight is None:
            return
        data = self.sse_tail + chunk
        if b'data: {"error"' in data and not self.flight.stream_error:  # a stream that ends in an error event failed
            self.flight.stream_error = stream_error_status(data)
        if b"usage" not in data:
            self.sse_tail = data[-64:] if not eos else b""
            return
        lines = data.split(b"\n")
        self.sse_tail = b"" if eos else lines.pop()[-65536:]
        for line in lines:
            if line.startswith(b"data:") and b'"usage"' in line:
                try:
                    self._take_usage(orjson.loads(line[5:].strip()))
                except orjson.JSONDecodeError:
                    continue
        if not data.lstrip().startswith(b"data:"):
            m = _JSON_USAGE.search(data[-65536:])
            if m is not None:
                try:
                    self._take_usage({"usage": orjson.loads(m.group(1))})
                except orjson.JSONDecodeError:
                    pass

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
            self.flight.input_tokens = _token_count(usage.get("prompt_tokens"), self.flight.input_tokens)
            self.flight.output_tokens = _token_count(usage.get("completion_tokens"), self.flight.output_tokens)

    # -- end --------------------------------------------------------------------------------------
    def finish(self, outcome: str) -> None:
        """The response is done: release the request's state (idempotent)."""
        self.done = True
        self.phase = DONE
        self.release(outcome)

    def release(self, outcome: str) -> None:
        """Give back everything the request holds — body budget, buffers, in-flight state — exactly once.

        Called at the end of the response, on an ImmediateResponse, on a protocol violation, and by
        the service when the stream ends for any reason (cancel, reset, error).
        """
        self._drop_body()
        self.response_buffer.clear()
        self.response_held = 0
        self.sse_tail = b""
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

