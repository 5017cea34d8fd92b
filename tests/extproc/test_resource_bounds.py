"""Regression tests for the audit's resource findings: metric cardinality (1), buffered bodies (2),
parse cost (8) — driven over real gRPC and HTTP against a running EPP."""

import asyncio
import json
import re
import time

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import async_wait_until
from tests.extproc.stream_driver import (
    REQ_HEADERS, full_exchange, no_request_state, request_body, request_headers, run_sequence,
)


async def scrape(epp) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{epp.ports['metrics']}/metrics") as r:
            assert r.status == 200
            return await r.text()


def label_values(text: str, metric: str, label: str) -> set[str]:
    return set(re.findall(rf'^{metric}{{[^}}]*{label}="([^"]*)"', text, re.M))


def chat(model: str) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()


# -- 1. client-chosen model names ------------------------------------------------------------------
async def test_distinct_model_names_do_not_grow_metrics(make_epp):
    epp = await make_epp(model_name_metric_label_limit=8)
    for i in range(200):
        out = await run_sequence(epp.stub, full_exchange(chat(f"invented-{i}")))
        assert out.code == grpc.StatusCode.OK
    text = await scrape(epp)
    models = label_values(text, "llm_d_epp_request_total", "model_name")
    assert len(models) == 9 and "other" in models  # 8 kept names + the overflow bucket
    assert label_values(text, "inference_objective_request_total", "model_name") == models
    total = sum(float(v) for v in re.findall(r"^llm_d_epp_request_total{.*} (\S+)$", text, re.M))
    assert total == 200  # nothing is lost, only folded
    assert len(text) < 9 * 60_000  # about 47 KB per label set with every histogram populated, under both names
    assert await async_wait_until(lambda: no_request_state(epp), timeout=3)


async def test_refused_requests_never_add_label_values(make_epp, tmp_path):
    epp = await make_epp(model_name_metric_label_limit=100)
    await run_sequence(epp.stub, full_exchange(chat("real-model")))
    for i in range(30):  # refused by scheduling (503: the subset hint matches nothing) and by parsing (400)
        h = request_headers()
        h.metadata_context.filter_metadata["envoy.lb.subset_hint"].update({"x-gateway-destination-endpoint-subset": ["10.9.9.9:1"]})
        out = await run_sequence(epp.stub, [h, request_body(chat(f"refused-{i}"))])
        assert out.immediate.status.code == 503
        out = await run_sequence(epp.stub, [request_headers(), request_body(chat(f"bad-{i}")[:-2])])
        assert out.immediate.status.code == 400
    text = await scrape(epp)
    assert label_values(text, "llm_d_epp_request_total", "model_name") == {"real-model", "other", ""}
    errors = re.findall(r'^llm_d_epp_request_error_total{[^}]*error_code="(\w+)"[^}]*} (\S+)$', text, re.M)
    assert {code for code, _ in errors} == {"ServiceUnavailable", "BadRequest"}


async def test_llm_d_names_and_gie_twins_carry_the_same_values(epp):
    from epp.datastore import EndpointMetrics

    epp.datastore.set_metrics("vllm-p2p-proxy", EndpointMetrics(waiting=4, running=2, kv_cache_usage=0.5, updated_at=1.0))
    for _ in range(3):
        await run_sequence(epp.stub, full_exchange())
    text = await scrape(epp)
    pairs = [
        ("llm_d_epp_request_total", "inference_objective_request_total"),
        ("llm_d_epp_request_duration_seconds_count", "inference_objective_request_duration_seconds_count"),
        ("llm_d_epp_request_size_bytes_sum", "inference_objective_request_sizes_sum"),
        ("llm_d_epp_response_size_bytes_count", "inference_objective_response_sizes_count"),
        ("llm_d_epp_request_input_tokens_sum", "inference_objective_input_tokens_sum"),
        ("llm_d_epp_request_output_tokens_sum", "inference_objective_output_tokens_sum"),
        ("llm_d_epp_request_ntpot_seconds_count", "inference_objective_normalized_time_per_output_token_seconds_count"),
        ("llm_d_epp_request_running", "inference_objective_running_requests"),
        ("llm_d_epp_scheduler_e2e_duration_seconds_count", "inference_extension_scheduler_e2e_duration_seconds_count"),
        ("llm_d_epp_plugin_duration_seconds_count", "inference_extension_plugin_duration_seconds_count"),
        ("llm_d_epp_ready_endpoints", "inference_pool_ready_pods"),
        ("llm_d_epp_average_kv_cache_utilization", "inference_pool_average_kv_cache_utilization"),
        ("llm_d_epp_average_queue_size", "inference_pool_average_queue_size"),
        ("llm_d_epp_info", "inference_extension_info"),
        ("llm_d_epp_scheduler_attempts_total", "inference_extension_scheduler_attempts_total"),
        ("llm_d_epp_per_endpoint_queue_size", "inference_pool_per_pod_queue_size"),
        ("llm_d_epp_average_running_requests", "inference_pool_average_running_requests"),
    ]
    for llmd, gie in pairs:
        a = sum(float(v) for v in re.findall(rf"^{llmd}(?:{{.*}})? (\S+)$", text, re.M))
        b = sum(float(v) for v in re.findall(rf"^{gie}(?:{{.*}})? (\S+)$", text, re.M))
        assert re.search(rf"^{llmd}", text, re.M) and a == b, (llmd, a, gie, b)
    assert 'llm_d_epp_request_total{fairness_id="default-flow",model_name="m",priority="0",target_model_name="m"} 3.0' in text
    assert "inference_objective_request_total{model_name=\"m\",target_model_name=\"m\"} 3.0" in text
    assert 'llm_d_epp_per_endpoint_queue_size{model_server_endpoint="vllm-p2p-proxy",name="local"} 4.0' in text
    assert 'llm_d_epp_average_kv_cache_utilization{name="local"} 0.5' in text
    assert re.search(r'^llm_d_epp_scheduler_attempts_total{endpoint_name="vllm-(p2p|fs)-proxy",namespace="",port="1808[12]",'
                     r'status="success",target_model_name="m"} ', text, re.M)


async def test_metrics_exposition_does_not_block_the_event_loop(epp, monkeypatch):
    """A slow render (a huge registry) runs in a worker thread: health and ext_proc keep answering."""
    real = epp.metrics_endpoint.render_fn

    def slow():
        time.sleep(1.5)  # sleeps without the GIL, like a render that takes long
        return real()

    monkeypatch.setattr(epp.metrics_endpoint, "render_fn", slow)
    scrapes = [asyncio.create_task(scrape(epp)) for _ in range(3)]
    await asyncio.sleep(0.2)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{epp.ports['health']}") as ch:
        t0 = time.perf_counter()
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        health_s = time.perf_counter() - t0
    out = await run_sequence(epp.stub, full_exchange())
    assert resp.status == health_pb2.HealthCheckResponse.SERVING and health_s < 0.5
    assert out.code == grpc.StatusCode.OK
    assert not any(t.done() for t in scrapes)
    texts = await asyncio.gather(*scrapes)
    assert all("llm_d_epp_request_total" in t for t in texts)
    assert epp.metrics_endpoint.renders == 1  # concurrent scrapes share one render


async def test_health_port_answers_while_the_event_loop_is_busy(epp, monkeypatch):
    """Kubelet's probes go to the health port, served from its own threads: a loop stalled in Python
    work (a huge body, a slow plugin) does not make the pod look dead."""
    real = epp.scheduler.schedule

    def stalls_the_loop(*a, **k):
        time.sleep(1.0)
        return real(*a, **k)

    monkeypatch.setattr(epp.scheduler, "schedule", stalls_the_loop)

    def probe() -> float:
        time.sleep(0.3)  # by now the loop is inside the scheduler
        with grpc.insecure_channel(f"127.0.0.1:{epp.ports['health']}") as ch:
            t0 = time.perf_counter()
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=0.6)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
            return time.perf_counter() - t0

    probing = asyncio.ensure_future(asyncio.to_thread(probe))
    out = await run_sequence(epp.stub, [request_headers(), request_body()])
    assert out.code == grpc.StatusCode.OK
    assert await probing < 0.5


# -- 2. an aggregate budget for buffered bodies -----------------------------------------------------------
async def test_held_bodies_are_bounded_by_the_budget(make_epp):
    mib = 1 << 20
    epp = await make_epp(max_buffered_body_bytes=3 * mib)
    held = []
    for _ in range(3):  # three slow uploads hold 1 MiB each, without end_of_stream
        call = epp.stub.Process()
        await call.write(request_headers())
        await call.write(request_body(b"x" * mib, eos=False))
        held.append(call)
    assert await async_wait_until(lambda: epp.processor.budget.held == 3 * mib, timeout=5)
    out = await run_sequence(epp.stub, [request_headers(), request_body(b"y" * 1000, eos=False), request_body(b"z", eos=True)])
    assert out.immediate is not None and out.immediate.status.code == 429
    assert out.immediate.body.decode().startswith("inference error: ResourceExhausted - request bodies held by the EPP")
    assert epp.processor.budget.held == 3 * mib  # the refused stream gave its bytes back
    for call in held:
        call.cancel()  # clients give up: Envoy resets the streams
    assert await async_wait_until(lambda: epp.processor.budget.held == 0 and no_request_state(epp), timeout=5)
    out = await run_sequence(epp.stub, full_exchange())
    assert out.code == grpc.StatusCode.OK and out.kinds()[-1] == "response_body"


async def test_budget_is_returned_after_every_outcome(make_epp):
    epp = await make_epp(max_buffered_body_bytes=1 << 20, max_request_body_bytes=100_000)
    await run_sequence(epp.stub, full_exchange())  # routed
    await run_sequence(epp.stub, [request_headers(), request_body(b"{bad")])  # 400
    await run_sequence(epp.stub, [request_headers(), request_body(b"x" * 200_000)])  # 413
    await run_sequence(epp.stub, [request_headers(), request_body(b"x" * 1000, eos=False), request_headers()])  # violation
    assert await async_wait_until(lambda: epp.processor.budget.held == 0 and no_request_state(epp), timeout=5)
    assert epp.processor.budget.peak > 0


# -- 8. parse cost is bounded with a clear 400 ------------------------------------------------------------
@pytest.mark.parametrize("body,fragment", [
    (json.dumps({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 60_000}]}).encode(),
     "too many JSON objects and arrays"),
    (b'{"model":"m","messages":[{"role":"user","content":' + b"[" * 10_000 + b"]" * 10_000 + b"}]}", "depth limit exceeded"),
])
async def test_pathological_bodies_are_refused_quickly(epp, body, fragment):
    t0 = time.perf_counter()
    out = await run_sequence(epp.stub, [request_headers(), request_body(body)])
    assert out.immediate is not None and out.immediate.status.code == 400
    assert fragment in out.immediate.body.decode()
    assert time.perf_counter() - t0 < 2.0  # a generous bound for a loaded machine; the parse itself is ~10 ms
    out = await run_sequence(epp.stub, full_exchange())
    assert out.kinds()[-1] == "response_body"


async def test_large_token_id_prompt_is_still_accepted(epp):
    body = json.dumps({"model": "m", "prompt": list(range(200_000))}).encode()
    out = await run_sequence(epp.stub, [request_headers({**REQ_HEADERS, ":path": "/v1/completions"}), request_body(body)])
    assert out.immediate is None and any(r.HasField("dynamic_metadata") for r in out.replies)
