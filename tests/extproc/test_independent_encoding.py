"""Wire compatibility checked with an independent encoding of Envoy's API (envoy-data-plane).

Requests are built and serialised with envoy-data-plane's betterproto2 classes, sent as raw bytes
over a gRPC channel, and the EPP's replies are decoded with the same independent classes.
"""

import json

import grpc
import pytest
from envoy_data_plane.envoy.config.core import v3 as core
from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import ProcessingModeBodySendMode as Mode
from envoy_data_plane.envoy.service.ext_proc import v3 as ep

METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"


def headers(end_of_stream=False, mode=None, request=True, items=None):
    hm = ep.HttpHeaders(
        headers=core.HeaderMap(headers=[core.HeaderValue(key=k, raw_value=v.encode()) for k, v in (items or {}).items()]),
        end_of_stream=end_of_stream,
    )
    kw = {"request_headers": hm} if request else {"response_headers": hm}
    if mode is not None:
        kw["protocol_config"] = ep.ProtocolConfiguration(request_body_mode=mode, response_body_mode=mode)
    return ep.ProcessingRequest(**kw)


@pytest.mark.parametrize("mode", [Mode.FULL_DUPLEX_STREAMED, Mode.BUFFERED])
async def test_independently_encoded_flow(epp, mode):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{epp.ports['grpc']}") as channel:
        call = channel.stream_stream(METHOD, request_serializer=bytes, response_deserializer=ep.ProcessingResponse.parse)()
        body = json.dumps({"model": "m", "prompt": "hello"}).encode()
        h = {":method": "POST", ":path": "/v1/completions", "x-request-id": "indep-1", "x-custom": "kept"}
        await call.write(headers(mode=mode, items=h))
        replies = []
        deferred = mode == Mode.FULL_DUPLEX_STREAMED
        if not deferred:  # BUFFERED: Envoy waits for the headers reply before sending the body
            replies.append(await call.read())
        await call.write(ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True)))
        while len(replies) < 2:
            replies.append(await call.read())
        head, tail = replies
        assert head.request_headers is not None
        routing = head.request_headers.response if deferred else tail.request_body.response
        set_headers = {o.header.key: o.header.raw_value.decode() for o in routing.header_mutation.set_headers}
        dest = set_headers["x-gateway-destination-endpoint"]
        assert dest in ("127.0.0.1:18081", "127.0.0.1:18082")
        assert routing.clear_route_cache is True
        md = (head if deferred else tail).dynamic_metadata
        assert md.fields["envoy.lb"].struct_value.fields["x-gateway-destination-endpoint"].string_value == dest
        bm = tail.request_body.response.body_mutation
        if deferred:
            assert bm.streamed_response.body == body and bm.streamed_response.end_of_stream
        else:
            assert bm.body == body
        await call.write(headers(request=False, items={":status": "200"}))
        r = await call.read()
        assert r.response_headers is not None
        await call.write(ep.ProcessingRequest(response_body=ep.HttpBody(body=b'{"usage":{}}', end_of_stream=True)))
        r = await call.read()
        assert r.response_body is not None
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        assert epp.director.inflight == {}


async def test_independently_decoded_immediate_response(epp):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{epp.ports['grpc']}") as channel:
        call = channel.stream_stream(METHOD, request_serializer=bytes, response_deserializer=ep.ProcessingResponse.parse)()
        await call.write(headers(items={":path": "/v1/completions"}))
        await call.write(ep.ProcessingRequest(request_body=ep.HttpBody(body=b"{oops", end_of_stream=True)))
        r = await call.read()
        assert r.immediate_response.status.code == 400
        assert r.immediate_response.body.startswith(b"inference error: BadRequest - ")
