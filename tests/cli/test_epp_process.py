"""`epp serve` as a real process: flags, health, metrics, decision log, `epp decisions`, TLS, shutdown."""

import asyncio
import json
import signal
import ssl
import subprocess
import sys
import urllib.request

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc_loadgen.envoy_flow import EnvoyStream
from tests.conftest import free_port, wait_until

ENDPOINTS = """endpoints:
- {name: vllm-p2p-proxy, address: 127.0.0.1, port: 18081, labels: {role: proxy, llm-d.ai/kv-backend: nvlink}}
- {name: vllm-fs-proxy, address: 127.0.0.1, port: 18082, labels: {role: proxy, llm-d.ai/kv-backend: fs}}
"""
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


def start(tmp_path, *extra):
    eps = tmp_path / "endpoints.yaml"
    eps.write_text(ENDPOINTS)
    ports = {"grpc": free_port(), "health": free_port(), "metrics": free_port()}
    log = open(tmp_path / "epp.log", "wb")
    # Go-style spellings on purpose: single dash, `=false`.
    cmd = [sys.executable, "-m", "epp.cli", "serve", f"-grpc-port={ports['grpc']}", "--grpc-health-port", str(ports["health"]),
           "--metrics-port", str(ports["metrics"]), "--bind-address", "127.0.0.1", "--endpoints-file", str(eps), *extra]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    return proc, ports, tmp_path / "epp.log"


def health_status(port, service=""):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status
        except grpc.RpcError:
            return None


def test_serve_health_metrics_decisions_and_shutdown(tmp_path):
    proc, ports, logfile = start(tmp_path, "--secure-serving=false", "--config-profile", "proxy-performance")
    try:
        assert wait_until(lambda: health_status(ports["health"]) == health_pb2.HealthCheckResponse.SERVING, timeout=20)
        assert health_status(ports["health"], "envoy.service.ext_proc.v3.ExternalProcessor") == health_pb2.HealthCheckResponse.SERVING

        async def traffic():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['grpc']}") as ch:
                stub = pb_grpc.ExternalProcessorStub(ch)
                for i in range(20):
                    s = EnvoyStream(stub)
                    res = await s.send_request({":path": "/v1/chat/completions", "x-request-id": f"req-{i}"}, BODY)
                    assert res.destination
                    await s.send_response(200, [b'{"usage":{"prompt_tokens":3,"completion_tokens":5}}'])
                    await s.close()
                s = EnvoyStream(stub)
                assert (await s.send_request({":path": "/v1/completions"}, b"{bad")).immediate.status.code == 400

        asyncio.run(traffic())
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=5).read().decode()
        assert 'inference_objective_request_total{model_name="m",target_model_name="m"} 20.0' in metrics
        assert "inference_extension_scheduler_e2e_duration_seconds_count 20.0" in metrics
        assert 'inference_extension_plugin_duration_seconds_count{extension_point="Scorer",plugin_name="active-request-scorer",plugin_type="active-request-scorer"} 20.0' in metrics
        assert 'inference_objective_request_error_total{error_code="BadRequest"' in metrics
        assert 'inference_pool_ready_pods{name="local"} 2.0' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    events = [json.loads(line) for line in logfile.read_text().splitlines() if line.startswith("{")]
    decisions = [e for e in events if e["msg"] == "Scoring decision"]
    assert len(decisions) == 20
    d = decisions[0]
    for key in ("request_id", "model", "profile", "prompt_tokens", "candidates", "scores", "totals", "picker", "selected", "kv_backend", "ts", "level"):
        assert key in d, key
    assert d["profile"] == "proxy-performance" and d["candidates"] == 2
    assert set(d["scores"]) == {"vllm-p2p-proxy", "vllm-fs-proxy"}
    assert any(e["msg"] == "EPP stopped" for e in events)
    out = subprocess.run([sys.executable, "-m", "epp.cli", "decisions", str(logfile)], capture_output=True, text=True, check=True).stdout
    assert "20 scoring decisions, 1 scheduling failures" in out
    assert "vllm-p2p-proxy" in out and "nvlink" in out and "BadRequest" in out
    summary = json.loads(subprocess.run([sys.executable, "-m", "epp.cli", "decisions", "--json", "-"], input=logfile.read_text(),
                                        capture_output=True, text=True, check=True).stdout)
    assert sum(summary["by_endpoint"].values()) == 20
    assert sum(summary["by_kv_backend"].values()) == 20


def test_secure_serving_with_self_signed_certificate(tmp_path):
    proc, ports, _ = start(tmp_path)  # --secure-serving defaults to true, as in the Go EPP
    try:
        assert wait_until(lambda: health_status(ports["health"]) == health_pb2.HealthCheckResponse.SERVING, timeout=20)
        pem = ssl.get_server_certificate(("127.0.0.1", ports["grpc"])).encode()
        creds = grpc.ssl_channel_credentials(root_certificates=pem)

        async def one():
            async with grpc.aio.secure_channel(f"127.0.0.1:{ports['grpc']}", creds, options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
                s = EnvoyStream(pb_grpc.ExternalProcessorStub(ch))
                res = await s.send_request({":path": "/v1/chat/completions"}, BODY)
                await s.close()
                return res.destination

        assert asyncio.run(one()) in ("127.0.0.1:18081", "127.0.0.1:18082")
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_config_errors_exit_with_a_message(tmp_path):
    eps = tmp_path / "e.yaml"
    eps.write_text(ENDPOINTS)
    bad = tmp_path / "bad.yaml"
    bad.write_text("plugins:\n- type: active-request-scorer\n  parameters:\n    idleThreshold: -1\n")
    for args, fragment in (
        (["--config-file", str(bad)], f"{bad}:4: plugins[0].parameters.idleThreshold"),
        (["--config-profile", "nope"], "unknown config profile 'nope'"),
        (["--config-text", "plugins: [oops"], "<config-text>:1: invalid YAML"),
    ):
        r = subprocess.run([sys.executable, "-m", "epp.cli", "--endpoints-file", str(eps), "--secure-serving=false", *args],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and fragment in r.stderr, (args, r.stderr)


def test_profiles_cli(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "epp.cli", "profiles", *a], capture_output=True, text=True)  # noqa: E731
    listed = run("list").stdout
    for name in ("default", "proxy-performance", "proxy-performance-by-backend"):
        assert name in listed
    assert "by-kv-backend" in run("show", "proxy-performance-by-backend").stdout
    good = run("validate", "proxy-performance")
    assert good.returncode == 0 and "valid" in good.stdout
    bad = tmp_path / "b.yaml"
    bad.write_text("plugins:\n- type: max-score-picker\nschedulingProfiles:\n- name: x\n  plugins:\n  - pluginRef: missing\n")
    r = run("validate", str(bad))
    assert r.returncode == 2 and f"{bad}:6: schedulingProfiles[0].plugins[0].pluginRef" in r.stderr
