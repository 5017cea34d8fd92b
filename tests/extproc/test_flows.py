"""The EPP driven over a real gRPC channel exactly as Envoy drives it, in all three body modes."""

import asyncio
import json

import pytest

from extproc_loadgen.envoy_flow import EnvoyStream
from tests.conftest import async_wait_until

MODES = ["FULL_DUPLEX_STREAMED", "BUFFERED", "STREAMED"]
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


@pytest.mark.parametrize("mode", MODES)
async def test_streaming_response_passes_through_and_releases(epp, mode):
    s = EnvoyStream(epp.stub, mode)
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
        await s.close()


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
