"""The EPP driven over a real gRPC channel exactly as Envoy drives it, in each body mode (STREAMED: refused)."""

import asyncio
import json

import grpc
import pytest

from extproc_loadgen.envoy_flow import EnvoyStream, headers_message
from tests.conftest import async_wait_until

MODES = ["FULL_DUPLEX_STREAMED", "BUFFERED"]  # the request body modes that route (STREAMED is refused)
# (request, response) body modes as the shipped configs pair them: BUFFERED requests stream their responses.
MODE_PAIRS = [("FULL_DUPLEX_STREAMED", "FULL_DUPLEX_STREAMED"), ("BUFFERED", "STREAMED"), ("BUFFERED", "BUFFERED")]
ENDPOINTS = {"127.0.0.1:18081", "127.0.0.1:18082"}


def chat(model="m", content="hello", **extra):
    return json.dumps({"model": model, "messages": [{"role": "user", "content": content}], **extra}).encode()


def req_headers(path="/v1/chat/completions", **extra):
    h = {":method": "POST", ":path": path, "content-type": "application/json", "x-request-id": "rid-1"}
    h.update(extra)
    return h


@pytest.mark.parametrize("mode", MODES)
async def test_routes_and_reemits_body(epp, mode):
    body = chat(content="x" * 150_000)  # several 62,000-byte chunks on the way back
    s = EnvoyStream(epp.stub, mode)
    res = await s.send_request(req_headers(), body, chunk=16_384)
    assert res.immediate is None
    assert res.destination in ENDPOINTS
    assert res.metadata["envoy.lb"]["x-gateway-destination-endpoint"] == res.destination
    assert res.clear_route_cache
    assert res.routing_headers["content-length"] == str(len(body))
    assert res.body == body
    if mode == "FULL_DUPLEX_STREAMED":
        assert res.body_chunks == [62_000, 62_000, len(body) - 124_000]
    usage = {"id": "c1", "model": "m", "usage": {"prompt_tokens": 37500, "completion_tokens": 3}}
    out = await s.send_response(200, [json.dumps(usage).encode()])
    assert json.loads(out.response_body) == usage
    await s.close()
    assert epp.director.inflight == {}


@pytest.mark.parametrize("mode,response_mode", MODE_PAIRS)
async def test_streaming_response_passes_through_and_releases(epp, mode, response_mode):
    s = EnvoyStream(epp.stub, mode, response_mode)
    res = await s.send_request(req_headers(), chat(stream=True))
    assert res.destination in ENDPOINTS
    assert len(epp.director.inflight) == 1
    chunks = [b'data: {"choices":[{"text":"a"}]}\n\n', b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":1}}\n\n', b"data: [DONE]\n\n"]
    out = await s.send_response(200, chunks, content_type="text/event-stream")
    assert out.response_body == b"".join(chunks)
    await s.close()
    assert epp.director.inflight == {}
    scorer = epp.built.plugins["active-request-scorer"]
    assert scorer.counts == {}


async def test_header_only_request_gets_an_endpoint(epp):
    s = EnvoyStream(epp.stub)
    res = await s.send_request({":method": "GET", ":path": "/v1/models"}, None)
    assert res.destination in ENDPOINTS
    await s.close()


async def test_generated_request_id_is_set(epp):
    s = EnvoyStream(epp.stub)
    h = req_headers()
    del h["x-request-id"]
    res = await s.send_request(h, chat())
    assert len(res.routing_headers["x-request-id"]) == 36
    await s.close()


async def test_subset_hint_limits_candidates(epp):
    for _ in range(10):
        s = EnvoyStream(epp.stub)
        res = await s.send_request(req_headers(), chat(), subset=["127.0.0.1:18082"])
        assert res.destination == "127.0.0.1:18082"
        await s.send_response(200, [b"{}"])
        await s.close()
    s = EnvoyStream(epp.stub)
    res = await s.send_request(req_headers(), chat(), subset=["10.9.9.9:80"])
    assert res.immediate.status.code == 503
    assert res.immediate.body.decode() == "inference error: ServiceUnavailable - failed to find endpoint candidates for serving the request"


async def test_client_cannot_choose_the_endpoint(epp):
    for mode in MODES:
        s = EnvoyStream(epp.stub, mode)
        h = req_headers(**{"x-gateway-destination-endpoint": "6.6.6.6:1", "x-gateway-destination-endpoint-served": "6.6.6.6:1", "x-prefiller-host-port": "6.6.6.6:2"})
        res = await s.send_request(h, chat())
        assert res.destination in ENDPOINTS
        assert "x-prefiller-host-port" in res.removed_headers
        assert "x-gateway-destination-endpoint-served" in res.removed_headers
        if mode == "BUFFERED":  # the headers reply that lets Envoy go on already drops the client's destination
            assert "x-gateway-destination-endpoint" in res.header_reply.request_headers.response.header_mutation.remove_headers
        await s.close()


@pytest.mark.parametrize("send_body_without_waiting", [False, True])
async def test_streamed_mode_is_refused_at_the_first_message(epp, send_body_without_waiting):
    """Envoy routes a STREAMED request when the headers reply arrives, before the body can be scheduled on."""
    s = EnvoyStream(epp.stub, "STREAMED")
    msg = headers_message(req_headers(**{"x-gateway-destination-endpoint": "6.6.6.6:1"}), mode="STREAMED")
    msg.protocol_config.send_body_without_waiting_for_header_response = send_body_without_waiting
    await s.call.write(msg)
    r = await s.call.read()
    assert r.immediate_response.status.code == 500
    assert r.immediate_response.body.decode().startswith("inference error: Internal - the gateway sends the request body in ext_proc mode STREAMED")
    assert "FULL_DUPLEX_STREAMED" in r.immediate_response.body.decode()
    await s.call.done_writing()  # Envoy ends its side after an ImmediateResponse
    assert await s.call.read() is grpc.aio.EOF  # nothing more: nothing routes the request
    assert epp.director.inflight == {}
    get = EnvoyStream(epp.stub, "STREAMED")  # a headers-only request routes at the headers reply, as in GIE
    assert (await get.send_request({":method": "GET", ":path": "/v1/models"}, None)).destination in ENDPOINTS
    await get.close()


@pytest.mark.parametrize("mode", MODES + ["STREAMED"])
async def test_bodiless_inference_post_gets_a_clear_400(epp, mode):
    """`Content-Length: 0` reaches the EPP as headers with end_of_stream: no body to route on."""
    s = EnvoyStream(epp.stub, mode)
    res = await s.send_request(req_headers("/v1/completions"), None)
    assert res.immediate.status.code == 400
    assert res.immediate.body.decode() == "inference error: BadRequest - error unmarshaling request bodyMap: empty request body"
    assert epp.director.inflight == {}


async def test_model_rewrite_is_restored_in_response(make_epp):
    epp = await make_epp(trust_model_rewrite_header=True)
    s = EnvoyStream(epp.stub)
    res = await s.send_request(req_headers(**{"x-gateway-model-name-rewrite": "served-model"}), chat(model="alias"))
    assert json.loads(res.body)["model"] == "served-model"
    out = await s.send_response(200, [b'{"id":"x","model":"served-model","choices":[]}'])
    assert json.loads(out.response_body)["model"] == "alias"
    await s.close()


async def test_cancel_and_reset_release_state(epp):
    scorer = epp.built.plugins["active-request-scorer"]
    streams = []
    for _ in range(6):
        s = EnvoyStream(epp.stub)
        await s.send_request(req_headers(), chat())
        streams.append(s)
    assert sum(scorer.counts.values()) == 6
    for s in streams[:3]:
        s.cancel()  # client disconnect: Envoy resets the stream
    for s in streams[3:]:
        await asyncio.wait_for(s.close(), 5)  # Envoy half-closes without a response (upstream reset)
    await async_wait_until(lambda: not scorer.counts and not epp.director.inflight, timeout=5)
    assert scorer.counts == {}


async def test_request_timeout_releases_state(make_epp):
    epp = await make_epp(request_timeout=0.2)
    scorer = epp.built.plugins["active-request-scorer"]
    s = EnvoyStream(epp.stub)
    await s.send_request(req_headers(), chat())
    assert sum(scorer.counts.values()) == 1
    await async_wait_until(lambda: not scorer.counts, timeout=5)
    assert epp.director.inflight == {}
    s.cancel()
