"""The seed's two-worker P/D cluster in the local stack, llm-d's layout, end to end.

gateway → EPP (decode pod + prefill pod) → the decode pod's sidecar → the prefill pod → KV over
the pair's link → the decode engine; the decision log shows both picks.
"""

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from local_stack.stack import LocalStack, StackPorts
from local_stack.topology import load_topology
from tests.conftest import free_port, metric_total, wait_until

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "local_stack" / "topologies" / "seed-pd-cluster.yaml"
LLMD_PD = ROOT / "tests" / "data" / "llm-d-pd-configs" / "router-head-pd-epp-config.yaml"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ports = StackPorts(free_port(), free_port(), free_port(), free_port())
    s = LocalStack(load_topology(str(SEED)), str(LLMD_PD), tmp_path_factory.mktemp("cluster"), ports)
    s.start(progress=lambda m: None)
    yield s
    s.stop()
    assert s.alive() == [], "processes left behind"


def decisions(stack):
    return [json.loads(line) for line in stack.epp_log.read_text().splitlines() if '"Scoring decision"' in line]


def counter(port, name, **labels):
    return metric_total(f"http://127.0.0.1:{port}/metrics", name, **labels)


def test_the_cluster_files_describe_the_pods_and_their_links(cluster):
    eps = {e["name"]: e for e in yaml.safe_load(cluster.endpoints_file.read_text())["endpoints"]}
    assert eps["decode-b"]["labels"] == {"llm-d.ai/role": "decode", "kubernetes.io/hostname": "worker-b", "llm-d.ai/kv-backend": "fs"}
    assert eps["decode-b"]["port"] == cluster.pods["decode-b"].sidecar_port  # a decode pod's endpoint is its sidecar
    assert eps["prefill-a"]["port"] == cluster.pods["prefill-a"].engine_port
    links = json.loads((cluster.workdir / "links" / "kv-link-profiles.json").read_text())["links"]
    by_pair = {(e["prefill"], e["decode"]): e["points"][-1]["seconds"] for e in links}
    # NVLink inside worker-a < Ethernet between workers < PCIe/shared storage inside worker-b, as measured
    assert by_pair[("prefill-a", "decode-a")] < by_pair[("prefill-a", "decode-b")] < by_pair[("prefill-b", "decode-b")]


def test_a_request_flows_through_both_picks_and_the_kv_crosses_the_link(cluster):
    before_prefill = {n: counter(cluster.pods[n].engine_port, "vllm:prompt_tokens_total") for n in ("prefill-a", "prefill-b")}
    for i in range(4):
        r = httpx.post(f"{cluster.gateway_url}/v1/completions", timeout=60,
                       json={"model": MODEL, "prompt": f"request {i} " + "the fabric decides " * 100, "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
    assert wait_until(lambda: len(decisions(cluster)) >= 4, 10)
    last = decisions(cluster)[-4:]
    for d in last:
        dis = d["notes"]["disaggregation"]
        assert dis["decision"] == "prefill-decode", dis
        assert d["selected_name"] in ("decode-a", "decode-b")
        prefill = d["request_headers"]["x-prefiller-host-port"]
        assert prefill == dis["prefill"] and prefill.endswith(tuple(f":{cluster.pods[n].engine_port}" for n in ("prefill-a", "prefill-b")))
    # the prefill pods did the prefills, the decode engines loaded their KV rather than computing it
    assert sum(counter(cluster.pods[n].engine_port, "vllm:prompt_tokens_total") - before_prefill[n] for n in before_prefill) >= 4 * 400
    loaded = sum(counter(cluster.pods[n].engine_port, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
                 for n in ("decode-a", "decode-b"))
    assert loaded >= 4 * 400
    oks = sum(counter(cluster.pods[n].sidecar_port, "pdproxy_prefill_peer_requests_total", outcome="ok") for n in ("decode-a", "decode-b"))
    assert oks >= 4


def test_pd_pairing_explains_its_decision_and_a_link_degrades_at_run_time(cluster):
    cluster.start_epp("pd-pairing")
    r = httpx.post(f"{cluster.gateway_url}/v1/completions", timeout=60,
                   json={"model": MODEL, "prompt": "paired " + "on the measured fabric " * 80, "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert wait_until(lambda: decisions(cluster) and decisions(cluster)[-1]["profile"] == "pd-pairing", 10)
    decider = decisions(cluster)[-1]["notes"]["disaggregation"]["prefill_decider"]
    assert decider["name"] == "cost-based-pd-decider" and decider["reason"]
    assert set(decider["pairs"]) == {"prefill-a", "prefill-b"} and all(p["link"] in ("pair", "live") for p in decider["pairs"].values())
    out = subprocess.run([sys.executable, "-m", "local_stack.cli", "degrade-link", "--workdir", str(cluster.workdir), "prefill-a", "decode-b",
                          "0.1"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "0.005 GB/s" in out.stdout, out.stdout + out.stderr
