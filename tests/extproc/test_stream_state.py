"""Regression tests for the audit's stream findings (3–6), over real gRPC with Envoy's message classes."""

import json

import grpc
import pytest
from structlog.testing import capture_logs

from tests.conftest import async_wait_until
from tests.extproc.stream_driver import (
    CHAT, REQ_HEADERS, full_exchange, no_request_state, request_body, request_headers, request_trailers,
    response_body, response_headers, response_trailers, run_sequence,
)


# -- 3. a body followed by request trailers is answered --------------------------------------------
@pytest.mark.parametrize("mode", [None, "BUFFERED"])
async def test_body_ended_by_request_trailers_is_routed_and_trailers_answered(epp, mode):
    seq = [request_headers(mode=mode), request_body(CHAT, eos=False), request_trailers()]
    out = await run_sequence(epp.stub, seq, half_close=False, timeout=10, until="request_trailers")
    kinds = out.kinds()
    assert "request_trailers" in kinds, kinds  # the trailers get their reply instead of hanging
    assert kinds[-1] == "request_trailers"
    routed = [r for r in out.replies if r.HasField("dynamic_metadata")]
    assert routed, "the body that ended at the trailers was routed"
    if mode is None:  # full duplex: the streamed body does not claim end_of_stream; the trailers end it
        chunks = [r.request_body.response.body_mutation.streamed_response for r in out.replies if r.HasField("request_body")]
        assert b"".join(c.body for c in chunks) == CHAT and not chunks[-1].end_of_stream
    assert out.code == grpc.StatusCode.CANCELLED or out.code == grpc.StatusCode.OK


async def test_streamed_body_ending_in_trailers_is_refused_clearly(epp):
    """A STREAMED request is refused at its headers (Envoy routes it before the body); what follows is drained."""
    out = await run_sequence(epp.stub, [request_headers(mode="STREAMED"), request_body(CHAT, eos=False), request_trailers()])
    assert out.immediate is not None and out.immediate.status.code == 500
    assert "configure request_body_mode FULL_DUPLEX_STREAMED (or BUFFERED)" in out.immediate.body.decode()
    assert await async_wait_until(lambda: no_request_state(epp), timeout=10)


async def test_response_body_ended_by_trailers_is_sent_on(epp):
    """A JSON response held for usage must be re-emitted when trailers, not end_of_stream, end it."""
    resp = b'{"model":"m","usage":{"prompt_tokens":3,"completion_tokens":2}}'
    seq = [request_headers(), request_body(), response_headers(), response_body(resp, eos=False), response_trailers()]
    out = await run_sequence(epp.stub, seq)
    assert out.code == grpc.StatusCode.OK
    chunks = [r.response_body.response.body_mutation.streamed_response for r in out.replies if r.HasField("response_body")]
    assert b"".join(c.body for c in chunks) == resp and not chunks[-1].end_of_stream
    assert out.kinds()[-1] == "response_trailers"
    assert await async_wait_until(lambda: no_request_state(epp), timeout=10)


async def test_a_response_too_large_to_hold_passes_through(make_epp):
    epp = await make_epp(max_request_body_bytes=100_000)
    big = [b'{"data":"' + b"z" * 60_000, b"z" * 60_000, b'","usage":{"prompt_tokens":7,"completion_tokens":5,"details":{"cached":0}}}']
    seq = [request_headers(), request_body(), response_headers(),
           *[response_body(c, eos=i == len(big) - 1) for i, c in enumerate(big)]]
    out = await run_sequence(epp.stub, seq)
    assert out.code == grpc.StatusCode.OK
    chunks = [r.response_body.response.body_mutation.streamed_response for r in out.replies if r.HasField("response_body")]
    assert b"".join(c.body for c in chunks) == b"".join(big) and chunks[-1].end_of_stream
    text = (await __import__("tests.extproc.test_resource_bounds", fromlist=["scrape"]).scrape(epp))
    assert "llm_d_epp_request_output_tokens_sum{" in text and "} 5.0" in text.split("llm_d_epp_request_output_tokens_sum{", 1)[1]


async def test_trailers_after_a_complete_body_are_answered(epp):
    seq = [request_headers(), request_body(CHAT, eos=True), request_trailers(), response_headers(), response_body(), response_trailers()]
    out = await run_sequence(epp.stub, seq)
    assert out.code == grpc.StatusCode.OK
    assert out.kinds().count("request_trailers") == 1 and out.kinds()[-1] == "response_trailers"
    assert await async_wait_until(lambda: no_request_state(epp), timeout=10)


# -- 4. EPP-owned headers from the client ------------------------------------------------------------
OWNED = {
    "x-gateway-model-name-rewrite": "some-other-model",
    "x-llm-d-model-name-rewrite": "some-other-model",
    "x-gateway-inference-objective": "premium",
    "x-gateway-inference-fairness-id": "tenant-a",
    "x-gateway-destination-endpoint-served": "6.6.6.6:1",
    "x-gateway-destination-endpoint-subset": "6.6.6.6:1",
    "x-prefiller-host-port": "6.6.6.6:2",
    "x-prefiller-url": "http://6.6.6.6:2",
}


@pytest.mark.parametrize("mode", [None, "BUFFERED"])
async def test_client_cannot_rewrite_the_model_and_owned_headers_are_removed(epp, mode):
    body = b'{"model":"cheap-model","prompt":"hi"}'
    headers = {**REQ_HEADERS, ":path": "/v1/completions", **OWNED}
    out = await run_sequence(epp.stub, [request_headers(headers, mode=mode), request_body(body)], timeout=10)
    removed, forwarded = set(), b""
    for r in out.replies:
        common = r.request_headers.response if r.HasField("request_headers") else r.request_body.response
        removed.update(common.header_mutation.remove_headers)
        bm = common.body_mutation
        forwarded += bm.streamed_response.body if bm.HasField("streamed_response") else bm.body
    assert json.loads(forwarded)["model"] == "cheap-model"  # forwarded as the client's own model
    assert set(OWNED) <= removed


async def test_model_rewrite_header_is_honoured_when_trusted(make_epp):
    epp = await make_epp(trust_model_rewrite_header=True)
    headers = {**REQ_HEADERS, ":path": "/v1/completions", "x-gateway-model-name-rewrite": "served-model"}
    out = await run_sequence(epp.stub, [request_headers(headers), request_body(b'{"model":"alias","prompt":"hi"}')], timeout=10)
    body = b"".join(r.request_body.response.body_mutation.streamed_response.body for r in out.replies if r.HasField("request_body"))
    assert json.loads(body)["model"] == "served-model"
    removed = [h for r in out.replies if r.HasField("request_headers") for h in r.request_headers.response.header_mutation.remove_headers]
    assert "x-gateway-model-name-rewrite" in removed  # the model server never sees it


# -- 5. response-path exceptions: logged once with the request id, answered, no gRPC error ---------------
@pytest.mark.parametrize("status", ["²", "18446744073709551616", "-1", "20 0", ""])
async def test_odd_response_status_is_handled(epp, status):
    seq = [*full_exchange()[:2], response_headers(status), response_body()]
    with capture_logs() as logs:
        out = await run_sequence(epp.stub, seq)
        assert await async_wait_until(lambda: no_request_state(epp), timeout=10)
    assert out.code == grpc.StatusCode.OK, out.details
    assert out.kinds()[-1] == "response_body"
    assert not [e for e in logs if e["log_level"] == "error"] and epp.processor.stream_errors == 0
    # still serving
    out = await run_sequence(epp.stub, full_exchange())
    assert out.code == grpc.StatusCode.OK and out.kinds()[-1] == "response_body"


async def test_an_exception_in_a_stream_is_logged_once_and_answered(epp, monkeypatch):
    def boom(*_a, **_k):
        raise RuntimeError("scorer exploded")

    monkeypatch.setattr(epp.scheduler, "schedule", boom)
    with capture_logs() as logs:
        out = await run_sequence(epp.stub, [request_headers(), request_body()])
    assert out.code == grpc.StatusCode.OK
    assert out.immediate is not None and out.immediate.status.code == 500
    assert out.immediate.body.decode().startswith("inference error: Internal - ")
    logged = [e for e in logs if e["event"] == "ext_proc stream failed"]
    assert len(logged) == 1 and logged[0]["request_id"] == "rid-x" and "scorer exploded" in logged[0]["error"]
    assert logged[0]["log_level"] == "error" and logged[0]["exc_info"]
    assert epp.processor.stream_errors == 1
    monkeypatch.undo()
    assert await async_wait_until(lambda: no_request_state(epp), timeout=10)
    out = await run_sequence(epp.stub, full_exchange())
    assert out.code == grpc.StatusCode.OK and out.kinds()[-1] == "response_body"


async def test_usage_with_absurd_token_counts_is_ignored(epp):
    usage = b'{"usage":{"prompt_tokens":18446744073709551616,"completion_tokens":true}}'
    out = await run_sequence(epp.stub, [*full_exchange()[:3], response_body(usage)])
    assert out.code == grpc.StatusCode.OK
    assert await async_wait_until(lambda: no_request_state(epp), timeout=10)


# -- 6. protocol-violating sequences release per-request state at once ------------------------------------
VIOLATIONS = {
    "trailers-then-request": [response_trailers(), request_headers(), request_body()],
    "response-body-then-request": [response_body(), request_headers(), request_body()],
    "two-bodies-with-eos": [request_headers(), request_body(), request_body()],
    "request-repeated": [*full_exchange(), *full_exchange()],
    "routed-then-request-again": [request_headers(), request_body(), request_headers(), request_body()],
    "body-before-headers": [request_body(), request_headers(), request_body()],
    "empty-message": [request_headers(), request_body(), response_headers(), __import__(
        "envoy.service.ext_proc.v3.external_processor_pb2", fromlist=["x"]).ProcessingRequest()],
}


async def test_envoys_own_reply_before_routing_is_answered_and_releases_the_body(epp):
    """Real Envoy sends response headers for its own 413 while a BUFFERED body is still arriving."""
    seq = [request_headers(mode="BUFFERED"), response_headers(status="413"), response_body(b"too large")]
    out = await run_sequence(epp.stub, seq, timeout=10)
    assert out.code == grpc.StatusCode.OK
    assert "response_headers" in out.kinds() and out.kinds()[-1] == "response_body"
    assert await async_wait_until(lambda: no_request_state(epp), timeout=10)


@pytest.mark.parametrize("name", sorted(VIOLATIONS))
async def test_protocol_violations_end_the_stream_cleanly_and_release_state(make_epp, name):
    epp = await make_epp(request_timeout=600)  # the reaper must not be what cleans up
    out = await run_sequence(epp.stub, VIOLATIONS[name], timeout=10)
    assert out.code == grpc.StatusCode.OK, (name, out.code, out.details)
    assert await async_wait_until(lambda: no_request_state(epp), timeout=10), name
    out = await run_sequence(epp.stub, full_exchange())
    assert out.code == grpc.StatusCode.OK and out.kinds()[-1] == "response_body"
    assert await async_wait_until(lambda: no_request_state(epp), timeout=10)
