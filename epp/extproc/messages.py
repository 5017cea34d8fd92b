"""Builders for the ext_proc replies the EPP sends (xds-protos classes: upb, fast)."""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.struct_pb2 import Struct

BODY_CHUNK_LIMIT = 62_000  # GIE's BodyByteLimit: below the 64 KiB per-chunk limit of some Envoy builds
DESTINATION_HEADER = "x-gateway-destination-endpoint"
LB_NAMESPACE = "envoy.lb"
SCORES_KEY = "x-gateway-destination-endpoint-scores"  # llm-d: endpoint ip:port -> scheduler score

# GIE error code -> HTTP status of the ImmediateResponse.
ERROR_STATUS = {
    "BadRequest": 400,
    "Unauthorized": 401,
    "Forbidden": 403,
    "NotFound": 404,
    "PayloadTooLarge": 413,
    "ResourceExhausted": 429,
    "Internal": 500,
    "ServiceUnavailable": 503,
}


def header_mutation(set_headers: Mapping[str, str], remove: Iterable[str] = ()) -> pb.HeaderMutation:
    return pb.HeaderMutation(
        set_headers=[HeaderValueOption(header=HeaderValue(key=k, raw_value=v.encode())) for k, v in set_headers.items()],
        remove_headers=list(remove),
    )


def destination_metadata(destination: str, scores: Mapping[str, float] | None = None) -> Struct:
    """`envoy.lb` → destination; with --emit-endpoint-scores also `x-gateway-destination-endpoint-scores`."""
    md = Struct()
    lb = md.get_or_create_struct(LB_NAMESPACE)
    lb[DESTINATION_HEADER] = destination
    if scores:
        lb.get_or_create_struct(SCORES_KEY).update(scores)
    return md


def request_headers_response(
    set_headers: Mapping[str, str] | None = None,
    remove: Iterable[str] = (),
    *,
    clear_route_cache: bool = False,
    metadata: Struct | None = None,
) -> pb.ProcessingResponse:
    common = pb.CommonResponse(clear_route_cache=clear_route_cache)
    if set_headers or remove:
        common.header_mutation.CopyFrom(header_mutation(set_headers or {}, remove))
    resp = pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common))
    if metadata is not None:
        resp.dynamic_metadata.CopyFrom(metadata)
    return resp


def response_headers_response(set_headers: Mapping[str, str] | None = None) -> pb.ProcessingResponse:
    common = pb.CommonResponse()
    if set_headers:
        common.header_mutation.CopyFrom(header_mutation(set_headers))
    return pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=common))


def streamed_chunks(body: bytes, *, request: bool, end_of_stream: bool = True) -> Iterator[pb.ProcessingResponse]:
    """The body as streamed_response mutations of ≤62,000 bytes; EoS on the last (one empty chunk if empty)."""
    n = len(body)
    starts = range(0, n, BODY_CHUNK_LIMIT) if n else (0,)
    last = starts[-1]
    for start in starts:
        chunk = body[start : start + BODY_CHUNK_LIMIT]
        common = pb.CommonResponse(
            body_mutation=pb.BodyMutation(
                streamed_response=pb.StreamedBodyResponse(body=chunk, end_of_stream=end_of_stream and start == last)
            )
        )
        br = pb.BodyResponse(response=common)
        yield pb.ProcessingResponse(request_body=br) if request else pb.ProcessingResponse(response_body=br)


def body_response(
    *,
    request: bool,
    body: bytes | None = None,
    clear_body: bool = False,
    set_headers: Mapping[str, str] | None = None,
    remove: Iterable[str] = (),
    clear_route_cache: bool = False,
    metadata: Struct | None = None,
) -> pb.ProcessingResponse:
    """A BUFFERED/STREAMED-mode body reply: CONTINUE, a replacement body, or withhold (clear_body)."""
    common = pb.CommonResponse(clear_route_cache=clear_route_cache)
    if body is not None:
        common.body_mutation.body = body
    elif clear_body:
        common.body_mutation.clear_body = True
    if set_headers or remove:
        common.header_mutation.CopyFrom(header_mutation(set_headers or {}, remove))
    br = pb.BodyResponse(response=common)
    resp = pb.ProcessingResponse(request_body=br) if request else pb.ProcessingResponse(response_body=br)
    if metadata is not None:
        resp.dynamic_metadata.CopyFrom(metadata)
    return resp


def trailers_response(request: bool) -> pb.ProcessingResponse:
    tr = pb.TrailersResponse()
    return pb.ProcessingResponse(request_trailers=tr) if request else pb.ProcessingResponse(response_trailers=tr)


def error_body(code: str, message: str) -> str:
    return f"inference error: {code} - {message}"


def immediate_response(code: str, message: str) -> pb.ProcessingResponse:
    status = ERROR_STATUS.get(code, 500)
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=HttpStatus(code=status),
            body=error_body(code, message).encode(),
            headers=header_mutation({"content-type": "text/plain; charset=utf-8"}),
            details=f"inference_epp_{code}",
        )
    )
