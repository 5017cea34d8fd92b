"""The ext_proc stream state machine under generated input, over real gRPC with Envoy's message classes.

A bounded fuzz run (fixed seed, a few thousand streams) and a property-based test (hypothesis):
for any sequence of messages that decodes, the stream ends with gRPC OK, nothing the request held
survives the stream, no handler exception happens, and the service answers a valid request afterwards.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import textwrap

import grpc
import pytest
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epp.server import EPPServer, ServerOptions
from extproc_loadgen.envoy_flow import MODES, headers_message
from tests.extproc.stream_driver import CHAT, REQ_HEADERS, full_exchange, no_request_state

ENDPOINTS = """
endpoints:
- {name: vllm-p2p-proxy, address: 127.0.0.1, port: 18081, labels: {role: proxy, llm-d.ai/kv-backend: nvlink}}
- {name: vllm-fs-proxy, address: 127.0.0.1, port: 18082, labels: {role: proxy, llm-d.ai/kv-backend: fs}}
"""


@pytest.fixture(scope="module")
def threaded_epp(tmp_path_factory):
    """A real EPP on its own event loop in a thread, driven by a blocking gRPC client from the test."""
    path = tmp_path_factory.mktemp("fuzz") / "endpoints.yaml"
    path.write_text(textwrap.dedent(ENDPOINTS))
    loop = asyncio.new_event_loop()
    server = EPPServer(ServerOptions(grpc_port=0, grpc_health_port=0, metrics_port=0, bind_address="127.0.0.1",
                                     endpoints_file=str(path), secure_serving=False, config_profile="proxy-performance",
                                     max_request_body_bytes=64_000, max_buffered_body_bytes=1 << 20,
                                     model_name_metric_label_limit=4, trust_model_rewrite_header=True))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.ports['grpc']}")
    server.sync_stub = pb_grpc.ExternalProcessorStub(channel)
    yield server
    channel.close()
    asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def drive(stub, messages) -> tuple[grpc.StatusCode, list[pb.ProcessingResponse]]:
    """One stream: write the messages, half-close, read every reply; the status it ends with."""
    replies = []
    try:
        for r in stub.Process(iter(messages), timeout=30):
            replies.append(r)
    except grpc.RpcError as e:
        return e.code(), replies
    return grpc.StatusCode.OK, replies


def settle(epp, timeout=15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if no_request_state(epp):
            return True
        time.sleep(0.01)
    return no_request_state(epp)


def still_serves(epp) -> None:
    code, replies = drive(epp.sync_stub, full_exchange())
    assert code == grpc.StatusCode.OK
    assert any(r.HasField("dynamic_metadata") for r in replies) and replies[-1].HasField("response_body")


# -- message generators -----------------------------------------------------------------------------------
ODD_TEXT = ["", "²", "18446744073709551616", "-1", "ﬀ", "\x00", "20 0", "999", "1" * 300, "\u202e", "null"]
HEADER_NAMES = [":path", ":status", "content-type", "x-request-id", "x-gateway-model-name-rewrite", "x-gateway-inference-fairness-id",
                "x-gateway-destination-endpoint", "x-prefiller-host-port", "x-kv-backend", "status", "content-length"]
PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/conversations", "/v2/x", "", "/" * 50]


def body_sample(rng: random.Random) -> bytes:
    kind = rng.randrange(9)
    model = rng.choice(["m", f"model-{rng.randrange(1000)}", "", "²" * 10, "x" * 500])
    if kind == 0:
        return json.dumps({"model": model, "messages": [{"role": "user", "content": rng.choice(["hi", [{"type": "text", "text": "a"}], None, 7])}]}).encode()
    if kind == 1:
        return json.dumps({"model": model, "prompt": rng.choice(["p", [1, 2, 3], [[1], [2]], ["a", "b"], [], {"a": 1}, True])}).encode()
    if kind == 2:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
    if kind == 3:
        return b"[" * rng.randrange(1, 3000) + b"]" * rng.randrange(0, 3000)
    if kind == 4:
        return json.dumps({"model": model, "input": rng.choice(["x", [], [{"content": "y"}], 5]), "items": [{"content": "z"}]}).encode()
    if kind == 5:
        return CHAT[: rng.randrange(len(CHAT))]
    if kind == 6:
        return b'{"model":"m","prompt":"' + b"y" * rng.randrange(0, 90_000) + b'"}'
    if kind == 7:
        return json.dumps({"model": model, "stream": True, "max_tokens": rng.choice([1, -1, 10**30, "x"]), "prompt": "s"}).encode()
    return b""


def response_body_sample(rng: random.Random) -> bytes:
    return rng.choice([
        b'{"model":"m","usage":{"prompt_tokens":3,"completion_tokens":2}}',
        b'data: {"usage":{"prompt_tokens":1,"completion_tokens":18446744073709551616}}\n\ndata: [DONE]\n\n',
        b'{"usage":{"prompt_tokens":"x","completion_tokens":[1]}}',
        bytes(rng.randrange(256) for _ in range(rng.randrange(0, 100))),
        b"data: " + b"u" * rng.randrange(0, 70_000),
        b"",
    ])


def headers_sample(rng: random.Random, request: bool) -> pb.ProcessingRequest:
    h = dict(REQ_HEADERS) if request else {":status": "200", "content-type": rng.choice(["application/json", "text/event-stream"])}
    if request:
        h[":path"] = rng.choice(PATHS)
    for _ in range(rng.randrange(0, 4)):
        h[rng.choice(HEADER_NAMES)] = rng.choice(ODD_TEXT + ["10.0.0.1:80", "text/event-stream", "m2"])
    mode = rng.choice([None, *MODES]) if request else None
    subset = rng.choice([None, None, [], ["127.0.0.1:18081"], ["10.9.9.9:1"], ["", "x"]]) if request else None
    msg = headers_message(h, end_of_stream=rng.random() < 0.1, request=request, mode=mode, subset=subset)
    if rng.random() < 0.05:  # raw header values that are not UTF-8
        msg_headers = msg.request_headers if request else msg.response_headers
        msg_headers.headers.headers.append(HeaderValue(key="x-raw", raw_value=b"\xff\xfe"))
    return msg


def message_sample(rng: random.Random) -> pb.ProcessingRequest:
    k = rng.randrange(8)
    if k == 0:
        return headers_sample(rng, True)
    if k == 1:
        return pb.ProcessingRequest(request_body=pb.HttpBody(body=body_sample(rng), end_of_stream=rng.random() < 0.6))
    if k == 2:
        return pb.ProcessingRequest(request_trailers=pb.HttpTrailers(trailers=HeaderMap(headers=[HeaderValue(key="t", value="v")])))
    if k == 3:
        return headers_sample(rng, False)
    if k == 4:
        return pb.ProcessingRequest(response_body=pb.HttpBody(body=response_body_sample(rng), end_of_stream=rng.random() < 0.5))
    if k == 5:
        return pb.ProcessingRequest(response_trailers=pb.HttpTrailers())
    if k == 6:
        return pb.ProcessingRequest()  # decodes, says nothing
    return pb.ProcessingRequest(request_headers=pb.HttpHeaders(end_of_stream=True))  # no headers at all


def stream_sample(rng: random.Random) -> list[pb.ProcessingRequest]:
    """Mostly Envoy-shaped flows with mutations, and some free-form sequences."""
    if rng.random() < 0.6:
        seq = list(full_exchange(body_sample(rng) if rng.random() < 0.5 else CHAT))
        for _ in range(rng.randrange(0, 3)):
            op = rng.randrange(3)
            if op == 0 and seq:
                seq.pop(rng.randrange(len(seq)))
            elif op == 1:
                seq.insert(rng.randrange(len(seq) + 1), message_sample(rng))
            elif seq:
                i = rng.randrange(len(seq))
                seq.insert(i, seq[i])  # a repeated message
        return seq
    return [message_sample(rng) for _ in range(rng.randrange(1, 9))]


# -- the tests ---------------------------------------------------------------------------------------------
def test_bounded_fuzz_of_the_stream_state_machine(threaded_epp):
    epp = threaded_epp
    rng = random.Random(20261124)
    t0 = time.monotonic()
    streams, failures = 0, []
    while streams < 2500 and time.monotonic() - t0 < 45:
        seq = stream_sample(rng)
        code, _ = drive(epp.sync_stub, seq)
        streams += 1
        if code != grpc.StatusCode.OK:
            failures.append((code, [m.WhichOneof("request") for m in seq]))
    assert streams >= 500, f"only {streams} streams in the time bound"
    assert not failures, failures[:5]
    assert epp.processor.stream_errors == 0, "a handler exception happened (see the log)"
    assert settle(epp), (epp.director.inflight, epp.processor.budget.held)
    still_serves(epp)
    assert settle(epp)
    assert len(epp.metrics.models.admitted) <= 4


messages = st.builds(lambda seed: message_sample(random.Random(seed)), st.integers(0, 2**32))
flows = st.builds(lambda seed: stream_sample(random.Random(seed)), st.integers(0, 2**32))


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(seq=st.one_of(st.lists(messages, min_size=1, max_size=10), flows))
def test_property_every_stream_ends_cleanly_and_releases_its_state(threaded_epp, seq):
    epp = threaded_epp
    code, _ = drive(epp.sync_stub, seq)
    assert code == grpc.StatusCode.OK
    assert epp.processor.stream_errors == 0
    assert settle(epp)
    still_serves(epp)
    assert settle(epp)
