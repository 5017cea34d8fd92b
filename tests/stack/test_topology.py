"""Topology files: the checked-in examples load, and mistakes are reported with file and field."""

from pathlib import Path

import pytest

from local_stack.topology import load_topology

TOPOLOGIES = sorted((Path(__file__).resolve().parents[2] / "local_stack" / "topologies").glob("*.yaml"))


@pytest.mark.parametrize("path", TOPOLOGIES, ids=lambda p: p.stem)
def test_checked_in_topologies_load(path):
    t = load_topology(str(path))
    assert {b.label for b in t.backends} <= {"nvlink", "fs"} and t.backends


def test_defaults_and_errors(tmp_path):
    t = load_topology(None)
    assert [(b.label, b.pairs) for b in t.backends] == [("nvlink", 1), ("fs", 1)]
    bad = tmp_path / "bad.yaml"
    bad.write_text("backends:\n- {label: fs, transfer: tape, proxy_name: p}\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: backends\.0\.transfer"):
        load_topology(str(bad))
    bad.write_text("latency: {prefill_tokens_per_secnd: 1}\n")
    with pytest.raises(ValueError, match="prefill_tokens_per_secnd"):
        load_topology(str(bad))


def test_real_vllm_engine_topology(tmp_path):
    t = load_topology(None, "vllm")
    assert t.engine == "vllm" and t.model == "tiny-llama"
    assert [(b.label, b.transfer) for b in t.backends] == [("nvlink", "nixl"), ("fs", "fs")]
    assert (t.shape.num_layers, t.shape.block_size, t.shape.dtype) == (2, 32, "float32")  # the tiny model's KV
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine: vllm\nbackends:\n- {label: nvlink, transfer: nccl, proxy_name: p}\n")
    with pytest.raises(ValueError, match="no P2P NCCL connector"):
        load_topology(str(bad))
    bad.write_text("engine: vllm\nvllm: {block_size: 16}\n")
    with pytest.raises(ValueError, match="multiple of 32"):
        load_topology(str(bad))
    far = tmp_path / "far.yaml"
    far.write_text("backends:\n- {label: nvlink, transfer: nixl, proxy_name: p, latency: {decode_ms_per_token: 30, speed_noise: 0.3}}\n"
                   "- {label: fs, transfer: fs, proxy_name: f}\n")
    t = load_topology(str(far))
    assert t.backends[0].latency.decode_ms_per_token == 30 and t.backends[1].latency is None
    assert "--speed-noise" in t.backends[0].latency.sim_flags()
