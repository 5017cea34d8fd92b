"""How real vLLM servers are started (no vLLM needed): flags, environment, connector configs, a clear error without the venv."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from local_stack.stack import _reset_prefix_cache

from vllm_cpu.server import NotInstalled, VllmCpu, kv_transfer_config


def test_command_and_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")  # would override --kv-cache-memory-bytes
    e = VllmCpu(venv=tmp_path)
    cmd = e.command(8123, kv_transfer_config("nixl", "decode"))
    assert cmd[:3] == [str(tmp_path / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server"]  # not `vllm serve`
    for flag, value in (("--block-size", "32"), ("--dtype", "float32"), ("--port", "8123"), ("--served-model-name", "tiny-llama")):
        assert cmd[cmd.index(flag) + 1] == value
    assert "--enforce-eager" in cmd and '"kv_role": "kv_consumer"' in cmd[cmd.index("--kv-transfer-config") + 1]
    env = e.env(side_channel_port=5601)
    assert "VLLM_CPU_KVCACHE_SPACE" not in env and env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind" and env["HF_HUB_OFFLINE"] == "1"
    assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5601"
    assert env["VLLM_SERVER_DEV_MODE"] == "1"  # /reset_prefix_cache, which epp-bench calls before every run
    events = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://127.0.0.1:5557", "topic": "kv@127.0.0.1:8000@tiny-llama"}
    cmd = e.command(8124, kv_transfer_config("nixl", "prefill"), kv_events_config=events)
    assert json.loads(cmd[cmd.index("--kv-events-config") + 1]) == events
    assert "--kv-events-config" not in e.command(8125)


def test_connector_configs():
    nixl = kv_transfer_config("nixl", "prefill", failure_policy="recompute")
    assert nixl["kv_connector"] == "NixlConnector" and nixl["kv_role"] == "kv_producer" and nixl["kv_buffer_device"] == "cpu"
    assert nixl["kv_load_failure_policy"] == "recompute"
    fs = kv_transfer_config("shared-storage", "decode", "/tmp/kv")
    assert fs == {"kv_connector": "ExampleConnector", "kv_role": "kv_consumer", "kv_connector_extra_config": {"shared_storage_path": "/tmp/kv"}}
    with pytest.raises(ValueError, match="P2pNcclConnector was removed"):
        kv_transfer_config("p2p-nccl", "prefill")


def test_missing_venv_says_what_to_run(tmp_path):
    with pytest.raises(NotInstalled, match="make vllm-setup"):
        VllmCpu(venv=tmp_path / "nowhere").check_installed()


def test_prefix_cache_reset_is_retried_while_blocks_are_held():
    """Real vLLM answers 200 `{"success": false}` while requests hold blocks, the simulator 409; both mean: try again."""
    answers = [(200, b'{"success": false}'), (200, b'{"success": true}'), (409, b"{}"), (200, b""), (404, b"{}")]

    class Engine(BaseHTTPRequestHandler):
        def do_POST(self):
            assert self.path == "/reset_prefix_cache"
            status, body = answers.pop(0)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Engine)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        assert [_reset_prefix_cache(port) for _ in range(4)] == [False, True, False, True]
        with pytest.raises(RuntimeError, match="VLLM_SERVER_DEV_MODE=1"):
            _reset_prefix_cache(port)
    finally:
        server.shutdown()
        server.server_close()


def test_real_engine_stack_gives_readiness_probes_time(tmp_path):
    """Real vLLM on two cores starves the proxies for seconds: the stack's profiles wait 10 s (three misses) and 120 s for a first byte."""
    import yaml

    from epp.config.loader import build, resolve_config
    from local_stack.stack import LocalStack, StackPorts
    from local_stack.topology import load_topology

    stacks = {engine: LocalStack(load_topology(None, engine), "default", tmp_path / engine, StackPorts(1, 2, 3, 4, kv_events=5))
              for engine in ("sim", "vllm")}
    for engine, stack in stacks.items():
        for name in ("default", "proxy-performance", "predicted-latency"):
            path = stack._epp_profiles() / f"{name}.yaml"
            health = next(p for p in yaml.safe_load(path.read_text())["plugins"] if p["type"] == "endpoint-health")
            readiness = health["parameters"]["readiness"]
            assert (readiness["timeout"], readiness.get("unhealthyThreshold")) == (("10s", 3) if engine == "vllm" else ("1s", None))
            assert health["parameters"]["firstByteTimeout"] == ("120s" if engine == "vllm" else "15s")
            build(resolve_config(config_file=str(path)))  # still a valid config
