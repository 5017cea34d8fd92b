"""P/D through the real ext_proc protocol: `epp serve --config-profile pd-pairing` as a process, Envoy's messages.

The decode pod is the destination; the prefill pick travels as x-prefiller-host-port (a client's
value never does); each decision is one `Scoring decision` event that explains itself; the
decisions are counted in llm_d_epp_disagg_decision_total.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2

from extproc_loadgen.envoy_flow import EnvoyStream
from tests.cli.test_epp_process import health_status
from tests.conftest import free_port, wait_until
from tests.disagg.test_links import write_links

H = {":method": "POST", ":path": "/v1/chat/completions", "content-type": "application/json"}


def body(chars: int, max_tokens: int) -> bytes:
    return json.dumps({"model": "m", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "x" * chars}]}).encode()


def endpoints_yaml(ports: dict[str, int]) -> str:
    """prefill-a on worker-a (NVLink node); prefill-b and decode-b on worker-b (PCIe / shared storage)."""
    rows = [("prefill-a", "prefill", "worker-a", "nvlink"), ("prefill-b", "prefill", "worker-b", "fs"), ("decode-b", "decode", "worker-b", "fs")]
    lines = ["endpoints:"]
    for name, role, host, backend in rows:
        lines.append(f"- {{name: {name}, address: 127.0.0.1, port: {ports[name]}, labels: "
                     f"{{llm-d.ai/role: {role}, kubernetes.io/hostname: {host}, llm-d.ai/kv-backend: {backend}}}}}")
    return "\n".join(lines) + "\n"


def test_pd_pairing_over_ext_proc(tmp_path):
    pods = {n: free_port() for n in ("prefill-a", "prefill-b", "decode-b")}  # nothing listens: metrics stay unscraped
    (tmp_path / "endpoints.yaml").write_text(endpoints_yaml(pods))
    links = write_links(tmp_path)
    ports = {"grpc": free_port(), "health": free_port(), "metrics": free_port()}
    log = tmp_path / "epp.log"
    cmd = [sys.executable, "-m", "epp.cli", "serve", "--grpc-port", str(ports["grpc"]), "--grpc-health-port", str(ports["health"]),
           "--metrics-port", str(ports["metrics"]), "--bind-address", "127.0.0.1", "--secure-serving=false",
           "--endpoints-file", str(tmp_path / "endpoints.yaml"), "--config-profile", "pd-pairing"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "EPP_KV_LINK_PROFILES": str(links)})
    decode, prefill_a = f"127.0.0.1:{pods['decode-b']}", f"127.0.0.1:{pods['prefill-a']}"
    try:
        assert wait_until(lambda: health_status(ports["health"]) == health_pb2.HealthCheckResponse.SERVING, timeout=30)

        async def traffic():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['grpc']}") as ch:
                stub = pb_grpc.ExternalProcessorStub(ch)
                # an idle decode pod prefills a short prompt itself; a client's prefill address is removed, never forwarded
                s = EnvoyStream(stub)
                res = await s.send_request({**H, "x-request-id": "short", "x-prefiller-host-port": "6.6.6.6:80"}, body(400, 10))
                assert res.destination == decode
                assert "x-prefiller-host-port" in res.removed_headers and "x-prefiller-host-port" not in res.routing_headers
                await s.send_response(200, [b'{"usage":{"prompt_tokens":100,"completion_tokens":10}}'])
                await s.close()
                # four long generations keep decode-b's batch busy (responses held open)
                held = [EnvoyStream(stub) for _ in range(4)]
                for i, h in enumerate(held):
                    assert (await h.send_request({**H, "x-request-id": f"bg{i}"}, body(400, 500))).destination == decode
                # a long prompt now pays for a prefill pod: across the workers (Ethernet) rather than worker-b's PCIe path
                results = {}
                for mode in ("FULL_DUPLEX_STREAMED", "BUFFERED"):
                    s = EnvoyStream(stub, mode=mode)
                    res = await s.send_request({**H, "x-request-id": f"long-{mode}", "x-prefiller-host-port": "6.6.6.6:80"}, body(32000, 20))
                    results[mode] = (res.destination, res.routing_headers.get("x-prefiller-host-port"), res.metadata)
                    await s.send_response(200, [b'{"usage":{"prompt_tokens":8000,"completion_tokens":20}}'])
                    await s.close()
                for h in held:
                    await h.send_response(200, [b'{"usage":{"prompt_tokens":100,"completion_tokens":500}}'])
                    await h.close()
                return results

        results = asyncio.run(traffic())
        for mode, (dest, prefill, metadata) in results.items():
            assert (dest, prefill) == (decode, prefill_a), mode
            assert metadata["envoy.lb"]["x-gateway-destination-endpoint"] == decode
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=5).read().decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    decisions = {e["request_id"]: e for e in events if e["msg"] == "Scoring decision"}
    assert set(decisions) == {"short", "bg0", "bg1", "bg2", "bg3", "long-FULL_DUPLEX_STREAMED", "long-BUFFERED"}
    short = decisions["short"]["notes"]["disaggregation"]
    assert short["decision"] == "decode-only" and "cheaper than the best pair" in short["prefill_decider"]["reason"]
    long = decisions["long-BUFFERED"]
    d = long["notes"]["disaggregation"]
    assert (d["decision"], d["decode"], d["prefill"]) == ("prefill-decode", decode, prefill_a)
    why = d["prefill_decider"]
    assert why["best_pair"] == "prefill-a" and "cheaper than prefilling on decode-b" in why["reason"]
    assert why["pairs"]["prefill-a"]["link"] == "class:none" and why["pairs"]["prefill-b"]["link"] == "class:host/fs"
    assert why["local"]["cost_ms"] > why["pairs"]["prefill-a"]["cost_ms"]
    assert long["request_headers"] == {"x-prefiller-host-port": prefill_a}
    assert long["selected"] == [decode] and long["profiles"] == {"prefill": [prefill_a]}
    assert set(long["notes"]["pd-pair-latency-scorer"]) == {"decode", "prefill"}
    counts = {}
    for e in decisions.values():
        kind = e["notes"]["disaggregation"]["decision"]
        counts[kind] = counts.get(kind, 0) + 1
    for kind, n in counts.items():
        assert (f'llm_d_epp_disagg_decision_total{{decision_type="{kind}",model_name="m",plugin_name="disagg-profile-handler",'
                f'plugin_type="disagg-profile-handler"}} {float(n)}') in metrics
    assert counts["prefill-decode"] >= 2 and counts["decode-only"] >= 1
    out = subprocess.run([sys.executable, "-m", "epp.cli", "decisions", str(log)], capture_output=True, text=True, check=True).stdout
    assert "P/D decision:" in out and "prefill-decode" in out and prefill_a in out
