"""Topology files: the checked-in examples load, and mistakes are reported with file and field."""

from pathlib import Path

import pytest
import yaml

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


def test_a_cluster_topology_names_every_pairs_link_and_refuses_gaps():
    seed = load_topology("local_stack/topologies/seed-pd-cluster.yaml").cluster
    assert [p.name for p in seed.decodes] == ["decode-a", "decode-b"]
    assert seed.link("prefill-a", "decode-a").kv_backend == "nvlink"
    assert seed.link("prefill-b", "decode-b").kv_backend == "fs"
    assert seed.link("prefill-a", "decode-b").kv_backend == "ethernet"
    spec = seed.links_spec()["links"]
    assert len(spec) == 4 and {e["backend"] for e in spec} == {"pull"}


@pytest.mark.parametrize("cluster, message", [
    ({"nodes": ["n1"], "pods": [{"name": "p", "node": "n1", "role": "prefill"}, {"name": "d", "node": "n2", "role": "decode"}]},
     "node 'n2' is not in nodes"),
    ({"nodes": ["n1", "n2"], "pods": [{"name": "p", "node": "n1", "role": "prefill"}, {"name": "d", "node": "n2", "role": "decode"}],
      "node_links": {"n1": {"gbps": 1}}}, "give between_nodes"),
    ({"nodes": ["n1"], "pods": [{"name": "p", "node": "n1", "role": "prefill"}, {"name": "q", "node": "n1", "role": "prefill"}]},
     "at least one prefill and one decode"),
])
def test_cluster_mistakes_are_named(tmp_path, cluster, message):
    f = tmp_path / "t.yaml"
    f.write_text(yaml.safe_dump({"cluster": cluster}))
    with pytest.raises(ValueError, match=message):
        load_topology(str(f))
