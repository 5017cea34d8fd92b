"""deploy/ rendered with `kubectl kustomize` for every overlay and checked as one system."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from epp.config import build, parse

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = sorted(p.name for p in (ROOT / "deploy" / "overlays").iterdir() if p.is_dir())
pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")


def render(overlay: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "deploy" / "overlays" / overlay)], capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def find(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name or d["metadata"]["name"].startswith(name + "-"))]
    assert found, f"no {kind} {name or ''}"
    return found


def arg(container, flag):
    for a in container.get("args", []):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def test_every_profile_has_an_overlay():
    assert {"default", "proxy-performance", "proxy-performance-by-backend", "bandwidth-aware", "predicted-latency"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_is_consistent(overlay):
    docs = render(overlay)
    cluster_scoped = ("ClusterRole", "ClusterRoleBinding")
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] not in cluster_scoped} == {"llm-d"}
    # -- the EPP and its one-word profile
    (epp,) = find(docs, "Deployment", "inference-epp")
    c = epp["spec"]["template"]["spec"]["containers"][0]
    assert "torch" not in c["image"] and c["image"].startswith("ghcr.io/inference-epp/epp:")
    env = {e["name"]: e for e in c["env"]}
    choice_ref = env["EPP_CONFIG_PROFILE"]["valueFrom"]["configMapKeyRef"]["name"]
    (choice,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == choice_ref]
    assert choice["data"]["profile"] == overlay, "the overlay's one word picks the profile"
    profiles_cm = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("epp-profiles")][0]
    assert f"{overlay}.yaml" in profiles_cm["data"]
    for fname, text in profiles_cm["data"].items():
        assert text == (ROOT / "profiles" / fname).read_text(), f"deploy/base/profiles/{fname} differs from profiles/{fname}"
        build(parse(text, fname))  # every shipped profile loads
    volumes = {v["name"]: v for v in epp["spec"]["template"]["spec"]["volumes"]}
    assert volumes["profiles"]["configMap"]["name"] == profiles_cm["metadata"]["name"]
    assert env["EPP_PROFILES_DIR"]["value"] == c["volumeMounts"][0]["mountPath"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": int(arg(c, "--grpc-port")), "grpc-health": int(arg(c, "--grpc-health-port")), "metrics": int(arg(c, "--metrics-port"))}
    assert (ports["grpc"], ports["grpc-health"], ports["metrics"]) == (9002, 9003, 9090)
    assert c["readinessProbe"]["grpc"]["port"] == ports["grpc-health"]
    (svc,) = find(docs, "Service", "inference-epp")
    assert {p["port"] for p in svc["spec"]["ports"]} == {9002, 9003, 9090}
    assert svc["spec"]["selector"] == epp["spec"]["template"]["metadata"]["labels"]
    # -- RBAC: least privilege, bound to the EPP's service account
    (role,) = find(docs, "Role")
    for rule in role["rules"]:
        assert set(rule["verbs"]) <= {"get", "list", "watch"}
    assert {r for rule in role["rules"] for r in rule["resources"]} == {"pods", "inferencepools", "inferenceobjectives"}
    (binding,) = find(docs, "RoleBinding")
    assert binding["subjects"][0]["name"] == epp["spec"]["template"]["spec"]["serviceAccountName"]
    # metrics auth (on with --pool-name): only creating token and access reviews, cluster-wide by nature
    (auth,) = find(docs, "ClusterRole", "inference-epp-metrics-auth")
    assert {(r["resources"][0], tuple(r["verbs"])) for r in auth["rules"]} == {("tokenreviews", ("create",)), ("subjectaccessreviews", ("create",))}
    (auth_binding,) = find(docs, "ClusterRoleBinding", "inference-epp-metrics-auth")
    assert auth_binding["subjects"][0] == {"kind": "ServiceAccount", "name": binding["subjects"][0]["name"], "namespace": "llm-d"}
    # -- the pool: its selector picks exactly the two proxies, on the port they serve
    (pool,) = find(docs, "InferencePool")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["metadata"]["name"] == arg(c, "--pool-name")
    sel = pool["spec"]["selector"]["matchLabels"]
    members = [d for d in docs if d["kind"] == "Deployment" and all(d["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items())]
    assert sorted(m["metadata"]["name"] for m in members) == ["vllm-fs-proxy", "vllm-p2p-proxy"]
    assert {m["spec"]["template"]["metadata"]["labels"]["llm-d.ai/kv-backend"] for m in members} == {"nvlink", "fs"}
    for m in members:
        pc = m["spec"]["template"]["spec"]["containers"][0]
        assert int(arg(pc, "--port")) == pc["ports"][0]["containerPort"] == pool["spec"]["targetPorts"][0]["number"]
        assert arg(pc, "--kv-backend") == m["spec"]["template"]["metadata"]["labels"]["llm-d.ai/kv-backend"]
        services = {s["metadata"]["name"]: {p["port"] for p in s["spec"]["ports"]} for s in find(docs, "Service")}
        for flag in ("--prefill", "--decode"):
            url = arg(pc, flag).split("=")[0]
            host, port = url.removeprefix("http://").split(":")
            assert int(port) in services[host], f"{m['metadata']['name']} {flag} points at a missing service port"
    ref = pool["spec"]["endpointPickerRef"]
    assert ref["name"] == svc["metadata"]["name"] and ref["port"]["number"] == 9002
    (route,) = find(docs, "HTTPRoute")
    backend = route["spec"]["rules"][0]["backendRefs"][0]
    assert (backend["kind"], backend["name"], backend["group"]) == ("InferencePool", pool["metadata"]["name"], "inference.networking.k8s.io")
    (gw,) = find(docs, "Gateway")
    assert route["spec"]["parentRefs"][0]["name"] == gw["metadata"]["name"]
    # -- vLLM pairs: the connector each backend needs
    for name, connector, role_ in (("vllm-prefill-p2p", "P2pNcclConnector", "kv_producer"), ("vllm-decode-p2p", "P2pNcclConnector", "kv_consumer"),
                                   ("vllm-prefill-fs", "SharedStorageConnector", "kv_both"), ("vllm-decode-fs", "SharedStorageConnector", "kv_both")):
        (dep,) = find(docs, "Deployment", name)
        vc = dep["spec"]["template"]["spec"]["containers"][0]
        kv = json.loads(arg(vc, "--kv-transfer-config"))
        assert (kv["kv_connector"], kv["kv_role"]) == (connector, role_)
        assert {e["name"]: e["value"] for e in vc["env"]}["VLLM_DISABLE_REQUEST_ID_RANDOMIZATION"] == "1"
        if connector == "SharedStorageConnector":
            mount = vc["volumeMounts"][0]["mountPath"]
            assert kv["kv_connector_extra_config"]["shared_storage_path"] == mount
    # -- the profiler writes where the proxies read, with the same image
    (job,) = find(docs, "Job")
    jc = job["spec"]["template"]["spec"]["containers"][0]
    proxy_images = {m["spec"]["template"]["spec"]["containers"][0]["image"] for m in members}
    assert proxy_images == {jc["image"]}
    for m in members:
        pc = m["spec"]["template"]["spec"]["containers"][0]
        profile_file = arg(pc, "--profile-file")
        assert profile_file.startswith("/profiles/") and f"--output-dir {str(Path(profile_file).parent)}" in jc["args"][0]


def test_epp_image_has_no_torch():
    text = (ROOT / "deploy" / "docker" / "epp.Dockerfile").read_text()
    install = [line for line in text.splitlines() if "pip install" in line][0]
    assert "[" not in install, "the EPP image installs no extras (torch lives in the backends extra)"
