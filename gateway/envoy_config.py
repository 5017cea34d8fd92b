"""The project's one Envoy configuration: the gateway that asks the EPP where each request goes.

Everything that runs Envoy renders it from here: `deploy/envoy/envoy.yaml` (and the kustomize
gateway built from that file) is `render(EnvoySettings.kubernetes())`, checked by a test to be
byte-identical; the local stack, the tests and the benchmark render it for 127.0.0.1.
Regenerate the checked-in file with `epp-gateway config --target kubernetes > deploy/envoy/envoy.yaml`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

BODY_MODES = ("FULL_DUPLEX_STREAMED", "BUFFERED", "STREAMED")
EPP_CLUSTER = "inference-epp"
UPSTREAM_CLUSTER = "original_destination_cluster"
DESTINATION_HEADER = "x-gateway-destination-endpoint"
SERVED_HEADER = "x-gateway-destination-endpoint-served"
LB_NAMESPACE = "envoy.lb"
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
DEFAULT_MAX_BODY = 16 * 1024 * 1024  # = `epp serve --max-request-body-bytes`'s default
EPP_UNAVAILABLE_BODY = "inference error: ServiceUnavailable - the endpoint picker is unreachable; retry shortly"


@dataclass
class EnvoySettings:
    """What differs between the places Envoy runs; every other line of the config is shared."""

    listen_address: str = "0.0.0.0"
    listen_port: int = 8081
    admin_address: str = "127.0.0.1"
    admin_port: int = 9901
    # EPP replicas as host:port. A DNS name (a Kubernetes Service) is resolved by Envoy (STRICT_DNS).
    epp: list[str] = field(default_factory=lambda: ["inference-epp.llm-d.svc.cluster.local:9002"])
    epp_tls: bool = True
    body_mode: str = "FULL_DUPLEX_STREAMED"
    # Envoy's buffer limit per connection: the EPP's body limit, so both refuse the same bodies.
    max_request_body_bytes: int = DEFAULT_MAX_BODY
    # Which of the EPP's two identical destination signals the ORIGINAL_DST cluster reads:
    # `metadata` (envoy.lb dynamic metadata; Envoy tries it first), `header`, or both.
    route_on: tuple[str, ...] = ("metadata", "header")
    # Development only: tell the client which endpoint served it (exposes pod addresses).
    served_header: bool = False
    access_log: bool = True
    request_timeout_s: int = 3600  # a whole LLM response, SSE included
    stream_idle_timeout_s: int = 300  # no byte either way for this long ends the stream
    epp_message_timeout_s: int = 1000  # the EPP may hold a request in its flow-control queue
    health_check_interval_s: float = 5.0
    health_check_no_traffic_interval_s: float = 1.0

    @classmethod
    def kubernetes(cls) -> EnvoySettings:
        return cls()

    @classmethod
    def local(cls, port: int, admin_port: int, epp_ports: list[int], **overrides: Any) -> EnvoySettings:
        """Everything on 127.0.0.1, the EPP in plaintext (`epp serve --secure-serving=false`)."""
        base = cls(listen_address="127.0.0.1", listen_port=port, admin_port=admin_port,
                   epp=[f"127.0.0.1:{p}" for p in epp_ports], epp_tls=False, served_header=True,
                   health_check_interval_s=1.0, health_check_no_traffic_interval_s=1.0)
        return replace(base, **overrides)

    def __post_init__(self) -> None:
        if self.body_mode not in BODY_MODES:
            raise ValueError(f"body mode {self.body_mode!r}: choose one of {', '.join(BODY_MODES)}")
        if not self.epp:
            raise ValueError("at least one EPP address (host:port) is needed")
        if not set(self.route_on) or not set(self.route_on) <= {"metadata", "header"}:
            raise ValueError("route_on: choose `metadata`, `header` or both")
        for address in self.epp:
            _hostport(address)


def _duration(seconds: float) -> str:
    return f"{seconds:g}s"


def _hostport(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"EPP address {address!r}: expected host:port")
    return host.strip("[]"), int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _processing_mode(body_mode: str) -> dict[str, str]:
    # BUFFERED holds the request until it is whole (routing needs the body) but streams the
    # response: a BUFFERED response would hold every SSE event until the end.
    response_mode = "STREAMED" if body_mode == "BUFFERED" else body_mode
    return {
        "request_header_mode": "SEND",
        "response_header_mode": "SEND",
        "request_body_mode": body_mode,
        "response_body_mode": response_mode,
        "request_trailer_mode": "SEND",
        "response_trailer_mode": "SEND",
    }


def access_log_config() -> list[dict]:
    fields = {
        "start": "%START_TIME%", "method": "%REQ(:METHOD)%", "path": "%REQ(:PATH)%", "status": "%RESPONSE_CODE%",
        "details": "%RESPONSE_CODE_DETAILS%", "flags": "%RESPONSE_FLAGS%", "upstream": "%UPSTREAM_HOST%",
        "request_id": "%REQ(X-REQUEST-ID)%", "bytes_in": "%BYTES_RECEIVED%", "bytes_out": "%BYTES_SENT%",
        "duration_ms": "%DURATION%",
    }
    return [{
        "name": "envoy.access_loggers.stdout",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
            "log_format": {"json_format": fields},
        },
    }]


def _ext_proc(s: EnvoySettings) -> dict:
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {
                "envoy_grpc": {"cluster_name": EPP_CLUSTER},
                # A replica that is gone is retried on another before the stream starts.
                "retry_policy": {"retry_on": "connect-failure,refused-stream,unavailable", "num_retries": 2,
                                 "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
                                                           "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}]},
            },
            # FULL_DUPLEX_STREAMED needs fail-closed; and a request the EPP never saw has no destination anyway.
            "failure_mode_allow": False,
            "status_on_error": {"code": "ServiceUnavailable"},
            "message_timeout": _duration(s.epp_message_timeout_s),
            "processing_mode": _processing_mode(s.body_mode),
            # Without this Envoy drops the envoy.lb metadata the EPP returns.
            "metadata_options": {"receiving_namespaces": {"untyped": [LB_NAMESPACE]}},
        },
    }


def _when(expression: str) -> dict:
    """A local-reply filter on a CEL expression (the reply's `response.code_details` tells who made it)."""
    return {"extension_filter": {
        "name": "envoy.access_loggers.extension_filters.cel",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                         "expression": expression},
    }}


def _local_reply_config(s: EnvoySettings) -> dict:
    """Bodies in the EPP's error format for the replies Envoy makes up itself (status_on_error has no body)."""
    too_large = f"inference error: PayloadTooLarge - request body exceeds the limit of {s.max_request_body_bytes} bytes"
    return {
        "mappers": [
            # The ext_proc stream failed: no EPP replica reachable (details `ext_proc_error_gRPC_error_14{…}`).
            {"filter": _when("response.code_details.startsWith('ext_proc_error')"), "status_code": 503,
             "body": {"inline_string": EPP_UNAVAILABLE_BODY}},
            # BUFFERED: Envoy's buffer limit refuses the body before the EPP sees it.
            {"filter": _when("response.code_details == 'request_payload_too_large'"), "body": {"inline_string": too_large}},
        ],
    }


def _listener(s: EnvoySettings) -> dict:
    route: dict[str, Any] = {
        "cluster": UPSTREAM_CLUSTER,
        "timeout": _duration(s.request_timeout_s),
        "idle_timeout": _duration(s.stream_idle_timeout_s),
    }
    route_entry: dict[str, Any] = {"match": {"prefix": "/"}, "route": route}
    if s.served_header:
        route_entry["response_headers_to_add"] = [
            {"header": {"key": SERVED_HEADER, "value": "%UPSTREAM_REMOTE_ADDRESS%"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        ]
    hcm: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "llm",
        "codec_type": "AUTO",
        "stream_idle_timeout": _duration(s.stream_idle_timeout_s),
        "local_reply_config": _local_reply_config(s),
        "route_config": {"name": "llm", "virtual_hosts": [{"name": "llm", "domains": ["*"], "routes": [route_entry]}]},
        "http_filters": [
            _ext_proc(s),
            {"name": "envoy.filters.http.router",
             "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
    }
    if s.access_log:
        hcm["access_log"] = access_log_config()
    return {
        "name": "llm",
        "address": {"socket_address": {"address": s.listen_address, "port_value": s.listen_port}},
        "per_connection_buffer_limit_bytes": s.max_request_body_bytes,
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    }


def _upstream_cluster(s: EnvoySettings) -> dict:
    lb: dict[str, Any] = {}
    if "metadata" in s.route_on:
        lb["metadata_key"] = {"key": LB_NAMESPACE, "path": [{"key": DESTINATION_HEADER}]}
    if "header" in s.route_on:
        lb["use_http_header"] = True
        lb["http_header_name"] = DESTINATION_HEADER
    return {
        "name": UPSTREAM_CLUSTER,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "5s",
        "per_connection_buffer_limit_bytes": s.max_request_body_bytes,
        "original_dst_lb_config": lb,
        "circuit_breakers": {"thresholds": [{"max_connections": 40000, "max_pending_requests": 40000, "max_requests": 40000}]},
    }


def _epp_cluster(s: EnvoySettings) -> dict:
    hosts = [_hostport(a) for a in s.epp]
    cluster: dict[str, Any] = {
        "name": EPP_CLUSTER,
        "type": "STATIC" if all(_is_ip(h) for h, _ in hosts) else "STRICT_DNS",
        "connect_timeout": "5s",
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        # One ext_proc stream per HTTP request in flight: Envoy's default of 1024 would refuse the rest.
        "circuit_breakers": {"thresholds": [{"max_connections": 40000, "max_pending_requests": 40000, "max_requests": 40000}]},
        "health_checks": [{
            "timeout": "1s",
            "interval": _duration(s.health_check_interval_s),
            # Without it the next probe after a failed one waits 60 s while the cluster has no traffic.
            "no_traffic_interval": _duration(s.health_check_no_traffic_interval_s),
            "unhealthy_threshold": 2,
            "healthy_threshold": 1,
            "grpc_health_check": {"service_name": EXT_PROC_SERVICE},
        }],
        # A replica that refuses connections is ejected at once instead of failing requests until the next probe.
        "outlier_detection": {
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 1,
            "interval": "1s",
            "base_ejection_time": "5s",
            "max_ejection_percent": 100,
        },
        "load_assignment": {
            "cluster_name": EPP_CLUSTER,
            "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": h, "port_value": p}}}} for h, p in hosts
            ]}],
        },
    }
    if s.epp_tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": {"alpn_protocols": ["h2"]},
            },
        }
    return cluster


def render(s: EnvoySettings) -> dict:
    """The bootstrap config as a dict (Envoy reads it as YAML or JSON)."""
    return {
        "admin": {"address": {"socket_address": {"address": s.admin_address, "port_value": s.admin_port}}},
        "static_resources": {"listeners": [_listener(s)], "clusters": [_upstream_cluster(s), _epp_cluster(s)]},
    }


HEADER = """\
# Generated from gateway/envoy_config.py (the one template the local stack and the tests also use);
# edit the template, then: epp-gateway config --target kubernetes > deploy/envoy/envoy.yaml
# The EPP behind a plain Envoy (no Gateway controller), GIE's reference setup: listener :8081 →
# ext_proc (the EPP, TLS, FULL_DUPLEX_STREAMED) → ORIGINAL_DST cluster routed on the destination
# the EPP returns (envoy.lb metadata, then the x-gateway-destination-endpoint header).
"""


def render_yaml(s: EnvoySettings, header: str = "") -> str:
    return header + yaml.safe_dump(render(s), sort_keys=False, default_flow_style=False, width=120)
