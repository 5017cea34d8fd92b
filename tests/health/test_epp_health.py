"""Endpoint health in a running EPP, driven over ext_proc as Envoy drives it.

Readiness probes are off here (the endpoints are addresses nobody listens on); the fault tests
in tests/faults run them against real processes.
"""

import asyncio
import json
import subprocess
import sys
import urllib.request

import grpc
import pytest
from structlog.testing import capture_logs

from epp.admin.v1 import admin_pb2, admin_pb2_grpc
from epp.config import resolve_config
from epp.config.loader import build
from epp.scheduling.framework import ConfigError
from extproc_loadgen.envoy_flow import EnvoyStream
from tests.conftest import async_wait_until

H = {":method": "POST", ":path": "/v1/completions", "content-type": "application/json"}
P2P, FS = "127.0.0.1:18081", "127.0.0.1:18082"


def body(stream=False):
    return json.dumps({"model": "m", "prompt": "hello", "max_tokens": 4, "stream": stream}).encode()


def config(**top):
    params = {"outlierDetection": {"consecutiveGatewayFailure": 2, "baseEjectionTime": "30s", "maxEjectionPercent": 50},
              "readiness": {"enabled": False}, **top}
    return "plugins: " + json.dumps([{"type": "endpoint-health", "parameters": params}, {"type": "round-robin-picker"}]) + "\n"


async def one(epp, status, i, stream=False):
    s = EnvoyStream(epp.stub)
    res = await s.send_request({**H, "x-request-id": f"r{i}"}, body(stream))
    if res.immediate is not None:
        await s.close()
        return None, res.immediate
    await s.send_response(status(res.destination) if callable(status) else status, [b'{"usage":{"prompt_tokens":1,"completion_tokens":1}}'])
    await s.close()
    return res.destination, None


async def test_failures_eject_before_filters_and_the_log_admin_api_and_metrics_say_so(make_epp):
    epp = await make_epp(config_profile=None, config_text=config())
    with capture_logs() as logs:
        picks = [(await one(epp, lambda d: 503 if d == P2P else 200, i))[0] for i in range(10)]
    assert picks[:4] == [P2P, FS, P2P, FS] or picks[:4] == [FS, P2P, FS, P2P]  # round-robin until the 2nd failure
    assert picks[4:] == [FS] * 6  # then the p2p proxy is out, whatever the picker would do
    decisions = [e for e in logs if e["event"] == "Scoring decision"]
    excluded = [d["excluded"] for d in decisions if "excluded" in d]
    assert len(excluded) == 6 and excluded[0]["vllm-p2p-proxy"].startswith("ejected: 2 gateway failures in a row (gateway_failure: status 503)")
    assert all("health_panic" not in d for d in decisions)
    ends = [e for e in logs if e["event"] == "Request ended"]
    assert [(e["endpoint"], e["outcome"], e["status"]) for e in ends] == [("vllm-p2p-proxy", "gateway_failure", 503)] * 2
    ejected = [e for e in logs if e["event"] == "Endpoint ejected"]
    assert len(ejected) == 1 and ejected[0]["reason"] == "consecutive_gateway_failure" and ejected[0]["ejection_seconds"] == 30.0

    async with grpc.aio.insecure_channel(f"unix:{epp.admin_socket}") as ch:
        eps = await admin_pb2_grpc.EndpointPickerAdminStub(ch).ListEndpoints(admin_pb2.ListEndpointsRequest())
    h = {e.name: e.health for e in eps.endpoints}
    assert h["vllm-p2p-proxy"].state == "ejected" and h["vllm-p2p-proxy"].outcomes == {"gateway_failure": 2}
    assert h["vllm-p2p-proxy"].ejections == {"consecutive_gateway_failure": 1} and 29 < h["vllm-p2p-proxy"].ejected_for_seconds <= 30
    assert h["vllm-fs-proxy"].state == "healthy" and h["vllm-fs-proxy"].outcomes == {"success": 8}
    assert h["vllm-fs-proxy"].HasField("ttfb_seconds") and not h["vllm-fs-proxy"].HasField("ready")

    metrics = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{epp.ports['metrics']}/metrics", timeout=5).read().decode())
    assert 'inference_epp_endpoint_health_state{endpoint="127.0.0.1:18081",name="vllm-p2p-proxy",state="ejected"} 1.0' in metrics
    assert 'inference_epp_endpoint_outcomes_total{endpoint="127.0.0.1:18082",name="vllm-fs-proxy",outcome="success"} 8.0' in metrics
    assert 'inference_epp_endpoint_ejections_total{endpoint="127.0.0.1:18081",name="vllm-p2p-proxy",reason="consecutive_gateway_failure"} 1.0' in metrics

    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "epp.cli", "endpoints", "--grpc-port", str(epp.ports["grpc"])],
                                  capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "health ejected (2 gateway failures in a row (gateway_failure: status 503);" in out.stdout
    assert "outcomes gateway_failure=2; ejections consecutive_gateway_failure=1" in out.stdout
    assert "health healthy; outcomes success=8" in out.stdout


async def test_no_healthy_endpoint_is_a_clear_503_without_panic(make_epp):
    epp = await make_epp(config_profile=None, config_text=config(outlierDetection={"consecutiveGatewayFailure": 1, "maxEjectionPercent": 100},
                                                                  panicThreshold=0))
    with capture_logs() as logs:
        assert (await one(epp, 502, 1))[0] is not None
        assert (await one(epp, 504, 2))[0] is not None
        dest, immediate = await one(epp, 200, 3)
    assert dest is None and immediate.status.code == 503
    assert immediate.body.decode().startswith("inference error: ServiceUnavailable - no healthy endpoint (vllm-")
    failure = [e for e in logs if e["event"] == "Scheduling failed"][0]
    assert set(failure["excluded"]) == {"vllm-p2p-proxy", "vllm-fs-proxy"}


async def test_panic_uses_every_endpoint_and_says_so(make_epp):
    epp = await make_epp(config_profile=None, config_text=config(outlierDetection={"consecutiveGatewayFailure": 1, "maxEjectionPercent": 100},
                                                                  panicThreshold=50))
    await one(epp, 503, 1)
    with capture_logs() as logs:
        await one(epp, 503, 2)  # the other one: both out
        dest, _ = await one(epp, 200, 3)
    assert dest in (P2P, FS)
    last = [e for e in logs if e["event"] == "Scoring decision"][-1]
    assert last["health_panic"] is True and set(last["excluded"]) == {"vllm-p2p-proxy", "vllm-fs-proxy"}


async def test_watchdog_fails_a_request_with_no_first_byte_and_a_client_error_is_no_failure(make_epp):
    epp = await make_epp(config_profile=None, config_text=config(firstByteTimeout="300ms"))
    s = EnvoyStream(epp.stub)
    res = await s.send_request({**H, "x-request-id": "hung"}, body(stream=True))
    hung = epp.endpoint_health.states[{P2P: "vllm-p2p-proxy", FS: "vllm-fs-proxy"}[res.destination]]
    assert await async_wait_until(lambda: hung.outcomes.get("first_byte_timeout") == 1, timeout=5)
    s.cancel()  # the client gives up: already counted, not counted again
    await asyncio.sleep(0.1)
    assert hung.outcomes == {"first_byte_timeout": 1} and hung.last_failure.startswith("first_byte_timeout: no response after")
    for i in range(4):
        await one(epp, 400, i)
    assert sum(st.outcomes.get("client_error", 0) for st in epp.endpoint_health.states.values()) == 4
    assert all(st.consecutive_gateway == 0 for st in epp.endpoint_health.states.values())


async def test_shipped_profiles_configure_it_and_a_config_without_it_gets_the_defaults(make_epp):
    for name in ("proxy-performance", "predicted-latency", "round-robin", "bandwidth-aware", "default"):
        built = build(resolve_config(profile=name))
        gate = built.plugins["endpoint-health"]
        assert gate.policy.outlier.consecutive_gateway_failure == 2 and gate.policy.readiness.path == "/health"
    epp = await make_epp(config_profile=None, config_text="plugins:\n- type: round-robin-picker\n")
    assert not epp.endpoint_health_configured and epp.endpoint_health.policy.enabled


def test_endpoint_health_is_listed_under_plugins_only():
    text = config() + "schedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: endpoint-health\n  - pluginRef: round-robin-picker\n"
    built = build(resolve_config(config_text=text))  # as the Go EPP does with plugins a profile cannot use: said, not fatal
    assert any("plugin 'endpoint-health' (endpoint-health) applies to the whole pool before any profile runs" in w for w in built.warnings)
    assert built.scheduler.describe()["profiles"]["default"]["picker"] == "round-robin-picker"
    two = "plugins:\n- {type: endpoint-health, name: a}\n- {type: endpoint-health, name: b}\n- {type: round-robin-picker}\n"
    with pytest.raises(ConfigError, match="only one endpoint-health plugin may be configured, found a, b"):
        build(resolve_config(config_text=two))
    with pytest.raises(ConfigError, match=r"outlierDetection\.baseEjection: unknown parameter"):
        build(resolve_config(config_text="plugins:\n- {type: endpoint-health, parameters: {outlierDetection: {baseEjection: 1s}}}\n"))


async def test_a_200_stream_that_ends_in_an_error_event_counts_as_a_failure(make_epp):
    epp = await make_epp(config_profile=None, config_text=config())
    s = EnvoyStream(epp.stub)
    res = await s.send_request({**H, "x-request-id": "broken-stream"}, body(stream=True))
    chunks = [b'data: {"choices": [{"text": "tok0 "}]}\n\n',
              b'data: {"error": {"message": "decode closed the connection mid-stream", "type": "DecodeError", "code": 502}}\n\ndata: [DONE]\n\n']
    with capture_logs() as logs:
        await s.send_response(200, chunks, content_type="text/event-stream")
        await s.close()
    name = {P2P: "vllm-p2p-proxy", FS: "vllm-fs-proxy"}[res.destination]
    assert epp.endpoint_health.states[name].outcomes == {"gateway_failure": 1}
    ended = [e for e in logs if e["event"] == "Request ended"]
    assert ended and ended[0]["outcome"] == "gateway_failure" and ended[0]["status"] == 200
    assert epp.endpoint_health.states[name].last_failure == "gateway_failure: error event 502 in a 200 stream"
