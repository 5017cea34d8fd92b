"""Admission and flow control through a real EPP over gRPC.

Sheddable requests (negative InferenceObjective priority) get 429 while the utilization detector,
fed by real /metrics scrapes, reads the pool as saturated; behind the flowControl gate requests
wait FCFS in priority bands until the concurrency detector sees room, time out with 429, are
refused beyond the queue's capacity, and leave the queue when the client goes away.
"""

from __future__ import annotations

import asyncio
import json
import textwrap

import pytest
from aiohttp import web

from extproc_loadgen.envoy_flow import EnvoyStream
from tests.conftest import async_wait_until, free_port

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]}).encode()
OBJECTIVES = """
objectives:
- {name: batch, priority: -1}
- {name: critical, priority: 10}
"""


class MetricsServer:
    """Two model servers' /metrics (vLLM names), with values the test sets."""

    def __init__(self) -> None:
        self.waiting = {"a": 0, "b": 0}
        self.port = free_port()

    async def handle(self, request: web.Request) -> web.Response:
        ep = request.match_info["ep"]
        text = (f"vllm:num_requests_waiting{{engine=\"0\"}} {self.waiting[ep]}\n"
                f"vllm:num_requests_running{{engine=\"0\"}} 1\nvllm:kv_cache_usage_perc{{engine=\"0\"}} 0.1\n")
        return web.Response(text=text, content_type="text/plain")

    async def __aenter__(self) -> "MetricsServer":
        app = web.Application()
        app.router.add_get("/{ep}/metrics", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()


def endpoints(tmp_path, metrics_port: int | None = None) -> str:
    url = lambda ep: f", metricsUrl: 'http://127.0.0.1:{metrics_port}/{ep}/metrics'" if metrics_port else ""  # noqa: E731
    path = tmp_path / "endpoints.yaml"
    path.write_text(textwrap.dedent(f"""
        endpoints:
        - {{name: a, address: 127.0.0.1, port: 18081, labels: {{role: proxy}}{url("a")}}}
        - {{name: b, address: 127.0.0.1, port: 18082, labels: {{role: proxy}}{url("b")}}}
        """) + OBJECTIVES)
    return str(path)


async def request(epp, objective: str | None = None, fairness: str | None = None, rid: str = "r") -> tuple[EnvoyStream, asyncio.Task]:
    headers = {":path": "/v1/chat/completions", "x-request-id": rid}
    if objective:
        headers["x-llm-d-inference-objective"] = objective
    if fairness:
        headers["x-llm-d-inference-fairness-id"] = fairness
    s = EnvoyStream(epp.stub)
    return s, asyncio.create_task(s.send_request(headers, BODY))


async def finish(stream: EnvoyStream) -> None:
    await stream.send_response(200, [b'{"usage":{"prompt_tokens":3,"completion_tokens":2}}'])
    await stream.close()


SHEDDING = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: utilization-detector
  parameters: {queueDepthThreshold: 5, kvCacheUtilThreshold: 0.8, metricsStalenessThreshold: 2s}
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins: [{pluginRef: queue-scorer}]
flowControl:
  saturationDetector: {pluginRef: utilization-detector}
"""


async def test_sheddable_requests_get_429_only_while_the_pool_is_saturated(make_epp, tmp_path):
    async with MetricsServer() as metrics:
        epp = await make_epp(endpoints_file=endpoints(tmp_path, metrics.port), config_profile=None, config_text=SHEDDING)
        assert epp.scraper is not None  # sheddable objectives exist, so the detector's metrics are scraped
        assert await async_wait_until(lambda: all(e.metrics.waiting == 0 for e in epp.datastore.endpoints()), 5)

        s, t = await request(epp, "batch")
        assert (await t).destination and (await t).immediate is None  # room: sheddable traffic is served
        await finish(s)

        metrics.waiting = {"a": 10, "b": 10}  # 10/5 = 2.0 >= 1.0: saturated
        assert await async_wait_until(lambda: all(e.metrics.waiting == 10 for e in epp.datastore.endpoints()), 5)
        s, t = await request(epp, "batch")
        res = await t
        assert res.immediate is not None and res.immediate.status.code == 429
        assert res.immediate.body == b"inference error: ResourceExhausted - system saturated, sheddable request dropped"
        # GIE's header name is honoured too; critical and unlabelled traffic is never shed
        s, t = await request(epp)
        assert (await t).destination
        await finish(s)
        s = EnvoyStream(epp.stub)
        res = await s.send_request({":path": "/v1/chat/completions", "x-gateway-inference-objective": "critical"}, BODY)
        assert res.destination
        await finish(s)
        s = EnvoyStream(epp.stub)
        res = await s.send_request({":path": "/v1/chat/completions", "x-gateway-inference-objective": "batch"}, BODY)
        assert res.immediate is not None and res.immediate.status.code == 429


FLOW = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: concurrency-detector
  parameters: {maxConcurrency: 1}
- type: active-request-scorer
schedulingProfiles:
- name: default
  plugins: [{pluginRef: active-request-scorer}]
flowControl:
  defaultRequestTTL: 1500ms
  maxRequests: 3
  saturationDetector: {pluginRef: concurrency-detector}
"""


async def test_flow_control_queues_fcfs_by_priority_with_ttl_capacity_and_cancel(make_epp, tmp_path):
    epp = await make_epp(endpoints_file=endpoints(tmp_path), config_profile=None, config_text=FLOW)
    fc = epp.flow_control
    # two endpoints × maxConcurrency 1: two requests go at once, the third waits
    s1, t1 = await request(epp, rid="r1")
    s2, t2 = await request(epp, rid="r2")
    r1, r2 = await t1, await t2
    assert {r1.destination, r2.destination} == {"127.0.0.1:18081", "127.0.0.1:18082"}
    s3, t3 = await request(epp, rid="r3")
    s4, t4 = await request(epp, "critical", rid="r4")  # arrives later, higher band
    s5, t5 = await request(epp, fairness="tenant-b", rid="r5")
    assert await async_wait_until(lambda: fc.queued == 3, 5)
    assert not (t3.done() or t4.done() or t5.done())
    # the queue holds at most 3 (global maxRequests): the next one is refused at once
    s6, t6 = await request(epp, rid="r6")
    r6 = await t6
    assert r6.immediate is not None and r6.immediate.status.code == 429 and b"capacity exceeded" in r6.immediate.body
    # one request ends: the critical one (higher band) is dispatched first, then FCFS
    await finish(s1)
    r4 = await asyncio.wait_for(t4, 5)
    assert r4.destination == r1.destination and not t3.done()
    await finish(s2)
    r3 = await asyncio.wait_for(t3, 5)
    assert r3.destination == r2.destination and not t5.done()
    # nothing frees up: the last one times out in the queue after defaultRequestTTL (429: the pool has endpoints)
    r5 = await asyncio.wait_for(t5, 5)
    assert r5.immediate is not None and r5.immediate.status.code == 429
    assert r5.immediate.body.startswith(b"inference error: ResourceExhausted - request timed out in queue")
    # a client that disconnects while queued leaves the queue
    s7, t7 = await request(epp, rid="r7")
    assert await async_wait_until(lambda: fc.queued == 1, 5)
    s7.cancel()
    assert await async_wait_until(lambda: fc.queued == 0, 5)
    for s in (s3, s4):
        await finish(s)
    # with room again, requests pass without waiting
    s8, t8 = await request(epp, rid="r8")
    assert (await asyncio.wait_for(t8, 5)).destination
    await finish(s8)
    exposed = await asyncio.to_thread(_metrics, epp.ports["metrics"])
    assert 'llm_d_epp_flow_control_requests_total{inference_pool="local",outcome="EvictedTTL",priority="0"} 1.0' in exposed
    assert 'inference_extension_flow_control_requests_total{inference_pool="local",outcome="RejectedCapacity",priority="0"} 1.0' in exposed
    assert 'llm_d_epp_flow_control_requests_total{inference_pool="local",outcome="EvictedContextCancelled",priority="0"} 1.0' in exposed
    assert 'llm_d_epp_flow_control_queue_size{inference_pool="local",priority="0"} 0.0' in exposed


async def test_flow_control_waits_for_endpoints_and_answers_503_when_none_come(make_epp, tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("endpoints: []\n")
    config = FLOW.replace("defaultRequestTTL: 1500ms", "defaultRequestTTL: 5s\n  noEndpointRequestTTL: 500ms")
    epp = await make_epp(endpoints_file=str(path), config_profile=None, config_text=config)
    s, t = await request(epp)
    res = await asyncio.wait_for(t, 5)
    assert res.immediate is not None and res.immediate.status.code == 503
    assert b"no endpoints are available" in res.immediate.body
    # an endpoint appearing while a request waits dispatches it (scale from zero)
    s, t = await request(epp)
    await asyncio.sleep(0.2)
    path.write_text("endpoints:\n- {name: a, address: 127.0.0.1, port: 18081}\n")
    epp.discovery.load()
    assert (await asyncio.wait_for(t, 5)).destination == "127.0.0.1:18081"


def _metrics(port: int) -> str:
    import urllib.request

    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


@pytest.mark.parametrize("emit", [False, True])
async def test_emit_endpoint_scores_in_envoy_lb_metadata(make_epp, emit):
    epp = await make_epp(emit_endpoint_scores=emit)
    s = EnvoyStream(epp.stub)
    res = await s.send_request({":path": "/v1/chat/completions"}, BODY)
    lb = res.header_reply.dynamic_metadata.fields["envoy.lb"].struct_value.fields
    assert lb["x-gateway-destination-endpoint"].string_value == res.destination
    if not emit:
        assert "x-gateway-destination-endpoint-scores" not in lb
    else:
        scores = {k: v.number_value for k, v in lb["x-gateway-destination-endpoint-scores"].struct_value.fields.items()}
        assert set(scores) == {"127.0.0.1:18081", "127.0.0.1:18082"} and all(0.0 <= v <= 1.0 for v in scores.values())
        assert scores[res.destination] == max(scores.values())
    await finish(s)


async def test_llm_d_header_names_for_model_rewrite(make_epp):
    epp = await make_epp(trust_model_rewrite_header=True)  # only a trusted gateway filter may set it
    s = EnvoyStream(epp.stub)
    body = json.dumps({"model": "alias", "messages": [{"role": "user", "content": "hi"}]}).encode()
    res = await s.send_request({":path": "/v1/chat/completions", "x-llm-d-model-name-rewrite": "served-model",
                                "x-gateway-model-name-rewrite": "ignored"}, body)
    assert json.loads(res.body)["model"] == "served-model"  # llm-d's name wins over GIE's alias
    out = await s.send_response(200, [b'{"id":"x","model":"served-model","choices":[]}'])
    assert json.loads(out.response_body)["model"] == "alias"
    await s.close()
