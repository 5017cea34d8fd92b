"""How real vLLM servers are started (no vLLM needed): flags, environment, connector configs, a clear error without the venv."""

import pytest

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
