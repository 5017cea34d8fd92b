"""Start a topology's P/D cluster (`cluster:`): prefill engines, decode engines with their sidecars, the links, the files the EPP reads."""

from __future__ import annotations

import json
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from local_stack.cluster import Cluster

if TYPE_CHECKING:
    from local_stack.stack import LocalStack

HOSTNAME_LABEL = "kubernetes.io/hostname"


@dataclass
class PodInfo:
    name: str
    role: str
    node: str
    kv_backend: str
    engine_port: int  # the simulator's HTTP port
    kv_port: int = 0  # prefill: its NIXL (pull) KV server
    sidecar_port: int = 0  # decode: pd-proxy --sidecar, the pod's endpoint

    @property
    def endpoint_port(self) -> int:
        return self.sidecar_port or self.engine_port


def start_cluster(stack: "LocalStack", progress) -> list:
    """Start every pod; returns (child, health URL) to wait for. Writes the endpoints file, the links spec and profiles."""
    from local_stack.stack import free_port

    t, c = stack.topology, stack.topology.cluster
    assert c is not None
    for p in c.pods:
        stack.pods[p.name] = PodInfo(p.name, p.role, p.node, p.kv_backend, free_port(), free_port() if p.role == "prefill" else 0,
                                     free_port() if p.role == "decode" else 0)
    write_endpoints(stack)
    profiles = profile_links(stack, c, progress) if t.profile_kv_transfer else None
    if profiles is not None:
        stack.epp_env["EPP_KV_LINK_PROFILES"] = str(profiles)
    (stack.workdir / "cluster.json").write_text(json.dumps({name: asdict(info) for name, info in stack.pods.items()}, indent=2))
    shape = ["--num-layers", str(t.shape.num_layers), "--num-kv-heads", str(t.shape.num_kv_heads), "--head-dim", str(t.shape.head_dim),
             "--block-size", str(t.shape.block_size), "--dtype", t.shape.dtype]
    pending = []
    for i, p in enumerate(c.pods):
        info = stack.pods[p.name]
        sim = ["vllm_sim.cli", "--role", p.role, "--port", str(info.engine_port), "--model", t.model, "--kv-backend", "nixl",
               "--seed", str(1000 + i), *t.latency.sim_flags(), *shape]
        if p.role == "prefill":
            sim += ["--kv-port", str(info.kv_port)]
        else:
            for q in c.prefills:
                link = c.link(q.name, p.name)
                sim += ["--peer-link", f"127.0.0.1:{stack.pods[q.name].kv_port}={link.gbps},{link.latency_ms}"]
        child = stack.procs.start(p.name, sim)
        pending.append((child, f"http://127.0.0.1:{info.engine_port}/health"))
        if p.role == "decode":
            side = stack.procs.start(f"{p.name}-sidecar", [
                "pd_proxy.cli", "--host", "127.0.0.1", "--port", str(info.sidecar_port), "--mode", "nixl", "--sidecar",
                "--decode", f"http://127.0.0.1:{info.engine_port}", "--endpoints-file", str(stack.endpoints_file),
                "--kv-backend", p.kv_backend or "nixl", "--kv-block-tokens", str(t.shape.block_size),
                "--scrape-interval", str(t.proxy_scrape_interval), "--live-profile-max-age", str(c.live_profile_max_age)])
            pending.append((side, f"http://127.0.0.1:{info.sidecar_port}/health"))
    progress(f"{len(c.prefills)} prefill pods, {len(c.decodes)} decode pods (each with its sidecar) starting")
    return pending


def write_endpoints(stack: "LocalStack") -> None:
    eps = [{"name": i.name, "address": "127.0.0.1", "port": i.endpoint_port,
            "labels": {"llm-d.ai/role": i.role, HOSTNAME_LABEL: i.node, **({"llm-d.ai/kv-backend": i.kv_backend} if i.kv_backend else {})}}
           for i in stack.pods.values()]
    stack.endpoints_file.write_text(yaml.safe_dump({"endpoints": eps}, sort_keys=False))


def profile_links(stack: "LocalStack", c: Cluster, progress) -> Path:
    """Every pair measured the Llumnix way over its link model: the kv-link-profiles file the EPP loads."""
    t = stack.topology
    spec = stack.workdir / "links.yaml"
    spec.write_text(yaml.safe_dump(c.links_spec(), sort_keys=False))
    out = stack.workdir / "links"
    stack.procs.run("profile-links", ["bandwidth_profiler.cli", "--links", str(spec), "--output-dir", str(out), "--no-progress",
                                      "--min-blocks", "1", "--max-blocks", "256", "--num-points", "5", "--num-samples", "3",
                                      "--warmup-blocks", "2", "--num-layers", str(t.shape.num_layers), "--num-kv-heads",
                                      str(t.shape.num_kv_heads), "--head-dim", str(t.shape.head_dim), "--block-size", str(t.shape.block_size),
                                      "--dtype", t.shape.dtype], timeout=300)
    doc = json.loads((out / "kv-link-profiles.json").read_text())
    for e in doc["links"]:
        pts = e["points"]
        progress(f"link {e['prefill']} -> {e['decode']} ({e['kv_backend']}): {pts[-1]['blocks']} blocks {pts[-1]['seconds'] * 1000:.1f} ms")
    return out / "kv-link-profiles.json"


def degrade_link(workdir: Path, prefill: str, decode: str, factor: float) -> str:
    """Scale the bandwidth of the link prefill -> decode of a running cluster (1 restores it); the decode engine's answer."""
    pods = json.loads((Path(workdir) / "cluster.json").read_text())
    p, d = pods.get(prefill), pods.get(decode)
    if not p or p["role"] != "prefill" or not d or d["role"] != "decode":
        raise ValueError(f"{prefill} -> {decode} is not a prefill -> decode pair of this cluster; pods: {', '.join(pods)}")
    req = urllib.request.Request(f"http://127.0.0.1:{d['engine_port']}/admin/link", method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"peer": f"127.0.0.1:{p['kv_port']}", "bandwidth_factor": factor}).encode())
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())["link"]
