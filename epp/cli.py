"""`epp`: serve (the default), profiles list|show|validate, decisions.

Flags are spelled as the Go EPP spells them and parsed the Go way too: `-grpc-port 9002`,
`--grpc-port=9002` and `--secure-serving=false` all work.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import Any, Sequence

from epp.util.duration import parse_duration

_TRUE = {"1", "t", "true", "yes", "y", "on"}
_FALSE = {"0", "f", "false", "no", "n", "off"}


def go_bool(value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {value!r}; use true or false")


def _duration(value: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def normalize_go_flags(argv: Sequence[str]) -> list[str]:
    """`-grpc-port` → `--grpc-port` (Go's flag package accepts one or two dashes); `-v=3` stays short."""
    out = []
    for a in argv:
        if a.startswith("-") and not a.startswith("--") and len(a) > 2 and a[2] != "=" and not a[1:].lstrip("-").isdigit():
            out.append("-" + a)
        else:
            out.append(a)
    return out


def _size(value: str) -> int:
    """gRPC message sizes as llm-d takes them: 10MiB, 25MB, 4Mi, 1048576."""
    import re

    from epp.util.quantity import parse_quantity

    text = value.strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kKMGT]i?)?B?", text)
    if m:
        unit = (m.group(2) or "").replace("K", "k") if not (m.group(2) or "").endswith("i") else (m.group(2) or "").replace("k", "K")
        text = m.group(1) + unit
    try:
        n = parse_quantity(text.replace("ki", "Ki"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {value!r}; use bytes or a size such as 10MiB, 25MB or 4Mi") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"size must not be negative, got {value!r}")
    return n


def _ports(value: str) -> list[int]:
    try:
        return [int(p) for p in value.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port list {value!r}; use comma-separated numbers such as 8000,8001") from None


class _Extend(argparse.Action):
    """pflag's IntSlice/StringSlice: comma lists, and repeating the flag adds to the list."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: D102
        current = list(getattr(namespace, self.dest) or [])
        setattr(namespace, self.dest, current + list(values))


def _bool_flag(g: Any, flag: str, default: bool, help: str) -> None:
    g.add_argument(flag, type=go_bool, nargs="?", const=True, default=default, help=help)


# Go EPP flags that have no effect here: accepted so Deployments start, with a startup warning when set to do something.
NO_EFFECT_FLAGS = {
    "tracing": "OpenTelemetry tracing is not implemented here; no spans are exported",
    "enable_pprof": "pprof is a Go profiler; there is nothing to serve here",
    "enable_grpc_stream_metrics": "ext_proc stream metrics are not implemented here",
}
DEPRECATED_METRIC_FLAGS = {
    "total_queued_requests_metric": "vllm:num_requests_waiting",
    "total_running_requests_metric": "vllm:num_requests_running",
    "kv_cache_usage_percentage_metric": "vllm:kv_cache_usage_perc",
    "lora_info_metric": "vllm:lora_requests_info",
    "cache_info_metric": "vllm:cache_config_info",
}
ALSO_READ = {"kv_cache_usage_percentage_metric": ("vllm:gpu_cache_usage_perc",)}  # GIE ≤ v1.2's default; read as a fallback


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="epp serve",
        description="Run the endpoint picker: an Envoy ext_proc server that routes each LLM request to a P/D proxy. "
                    "Flags are the Go EPP's (GIE, llm-d router v0.10) with their meaning; see docs/configuration.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("servers")
    g.add_argument("--grpc-port", type=int, default=9002, help="ext_proc gRPC port")
    g.add_argument("--grpc-health-port", type=int, default=9003, help="gRPC health port (grpc.health.v1: liveness, readiness, inference-extension, ...)")
    g.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics port")
    g.add_argument("--bind-address", default="0.0.0.0", help="address every server listens on")
    _bool_flag(g, "--secure-serving", True, "serve ext_proc over TLS (self-signed unless --cert-path)")
    g.add_argument("--cert-path", default=None, help="directory holding tls.crt and tls.key for --secure-serving")
    _bool_flag(g, "--enable-cert-reload", False, "re-read tls.crt/tls.key from --cert-path when they change (new connections use the new pair)")
    g.add_argument("--tls-min-version", default="", help="minimum TLS version: VersionTLS10..VersionTLS12 (gRPC always requires 1.2); VersionTLS13 is refused")
    g.add_argument("--tls-cipher-suites", type=lambda v: [x.strip() for x in v.split(",") if x.strip()], action=_Extend, default=[],
                   help="TLS 1.2 cipher suites, Go crypto/tls names, comma-separated (TLS 1.3 suites are not configurable)")
    g.add_argument("--grpc-max-recv-msg-size", type=_size, default=None, help="largest gRPC message accepted, e.g. 10MiB (default 64MiB here)")
    g.add_argument("--grpc-max-send-msg-size", type=_size, default=None, help="largest gRPC message sent, e.g. 10MiB (default: unlimited)")
    g.add_argument("--drain-timeout", type=_duration, default="30s",
                   help="on SIGTERM: NOT_SERVING at once and the leader lease released; new streams are refused and open ones get this long to finish")
    g.add_argument("-v", "--v", dest="verbosity", type=int, default=2, help="log verbosity: 2 info, 3+ debug")
    _add_access_and_limit_flags(p)
    g = p.add_argument_group("endpoints")
    g.add_argument("--endpoints-file", default=None, help="static endpoints YAML (reloaded on change); the local default")
    g.add_argument("--pool-name", default="", help="InferencePool to discover endpoints from (Kubernetes)")
    g.add_argument("--pool-namespace", default=os.environ.get("NAMESPACE", "default"), help="namespace of the InferencePool (env NAMESPACE)")
    g.add_argument("--pool-group", default="inference.networking.k8s.io", help="API group of the InferencePool (only inference.networking.k8s.io, v1)")
    g.add_argument("--endpoint-selector", default="", help="standalone mode, no InferencePool: pods matching this label selector "
                   "(app=vllm,env in (a,b),tier!=x,key,!key) are endpoints")
    g.add_argument("--endpoint-target-ports", type=_ports, action=_Extend, default=[], help="standalone mode: 1-8 ports per pod, e.g. 8000,8001")
    g.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster, then ~/.kube/config)")
    _bool_flag(g, "--disable-endpoint-subset-filter", False, "ignore Envoy's envoy.lb.subset_hint")
    g = p.add_argument_group("scheduling")
    g.add_argument("--config-file", default=None, help="EndpointPickerConfig YAML file")
    g.add_argument("--config-text", default=None, help="EndpointPickerConfig YAML given inline")
    g.add_argument("--config-profile", default=os.environ.get("EPP_CONFIG_PROFILE"),
                   help="named profile from profiles/ (env EPP_CONFIG_PROFILE; `default` when nothing is given)")
    _bool_flag(g, "--allow-experimental-plugins", False, "load plugins marked experimental (llm-d's alpha), e.g. utilization-filter")
    _bool_flag(g, "--emit-endpoint-scores", False, "put every scored endpoint's weighted total in envoy.lb metadata under x-gateway-destination-endpoint-scores")
    g.add_argument("--max-request-body-bytes", type=int, default=16 * 1024 * 1024,
                   help="larger request bodies are refused with 413 without being buffered")
    g.add_argument("--request-timeout", type=_duration, default="10m",
                   help="per-request state is released after this long even if the stream never ends (Go duration)")
    g.add_argument("--refresh-metrics-interval", type=_duration, default="50ms",
                   help="how often endpoint /metrics are scraped, when something needs them (Go duration; at least 50ms)")
    g.add_argument("--metrics-staleness-threshold", type=_duration, default="2s",
                   help="endpoint metrics older than this are reported stale (Go duration)")
    g.add_argument("--model-server-metrics-scheme", default=None, help="(deprecated GIE flag) metrics scheme, http or https; prefer metrics-data-source's scheme")
    g.add_argument("--model-server-metrics-path", default=None, help="(deprecated GIE flag) metrics path; prefer metrics-data-source's path")
    g.add_argument("--model-server-metrics-port", type=int, default=0, help="(deprecated GIE flag) scrape this port instead of the endpoint's port")
    g.add_argument("--model-server-metrics-https-insecure-skip-verify", type=go_bool, nargs="?", const=True, default=None,
                   help="(deprecated GIE flag) skip TLS verification when scraping over https")
    for flag, default in DEPRECATED_METRIC_FLAGS.items():
        g.add_argument("--" + flag.replace("_", "-"), default=default,
                       help="(deprecated) only vLLM's name is read here; any other value is an error (llm-d: use engineConfigs)")
    g = p.add_argument_group("high availability")
    _bool_flag(g, "--ha-enable-leader-election", False, "replicas elect a leader on a Kubernetes Lease; only the leader is ready")
    g.add_argument("--leader-election-lease-duration", type=_duration, default="15s", help="how long a lease is valid without renewal")
    g.add_argument("--leader-election-renew-deadline", type=_duration, default="10s", help="a leader that cannot renew for this long steps down")
    g.add_argument("--leader-election-retry-period", type=_duration, default="2s", help="how often the lease is renewed or tried")
    g = p.add_argument_group("Go EPP compatibility", "accepted so existing Deployments start unchanged; a warning at startup says when one has no effect here")
    g.add_argument("--zap-encoder", choices=("json", "console"), default="json", help="log format (the decision log is JSON lines)")
    g.add_argument("--zap-log-level", default="", help="debug, info, error, or a verbosity number; overrides -v")
    _bool_flag(g, "--zap-devel", False, "accepted; the format follows --zap-encoder")
    g.add_argument("--zap-stacktrace-level", default="error", help="accepted; tracebacks are logged with errors")
    g.add_argument("--zap-time-encoding", default="iso8601", help="accepted; times are ISO-8601 UTC")
    g.add_argument("--refresh-prometheus-metrics-interval", type=_duration, default="5s", help="accepted; pool gauges are computed at each scrape")
    _bool_flag(g, "--health-checking", False, "accepted; health is always served on the ext_proc port too")
    for flag in NO_EFFECT_FLAGS:
        _bool_flag(g, "--" + flag.replace("_", "-"), False, f"accepted; {NO_EFFECT_FLAGS[flag]}")
    g.add_argument("--metrics-cert-dir", default="", help="directory with tls.crt/tls.key: serve /metrics over TLS")
    g.add_argument("--metrics-client-ca-file", default="", help="PEM CA: /metrics requires client certificates it signed (needs --metrics-cert-dir)")
    return p


def check_flags(args: argparse.Namespace) -> list[str]:
    """Flag combinations the Go EPP refuses, refused the same way; returns warnings for flags without effect here."""
    if args.pool_group != "inference.networking.k8s.io":
        raise ValueError(f"--pool-group {args.pool_group!r} is not supported; only inference.networking.k8s.io (v1) InferencePools are read")
    if args.endpoint_selector and args.pool_name:
        raise ValueError("give --pool-name or --endpoint-selector, not both")
    if args.endpoint_target_ports and not args.endpoint_selector:
        raise ValueError("--endpoint-target-ports needs --endpoint-selector (standalone mode)")
    if args.endpoint_selector:
        from epp.util.label_selector import parse_selector

        try:
            parse_selector(args.endpoint_selector)
        except ValueError as e:
            raise ValueError(f"--endpoint-selector: {e}") from None
        ports = set(args.endpoint_target_ports)
        if not 1 <= len(ports) <= 8 or any(not 0 < p < 65536 for p in ports):
            raise ValueError("--endpoint-target-ports needs 1 to 8 ports (1-65535) with --endpoint-selector, e.g. --endpoint-target-ports=8000,8001")
    if args.config_file and args.config_text:
        raise ValueError('both the "config-file" and "config-text" flags cannot be set at the same time')
    if args.metrics_client_ca_file and not args.metrics_cert_dir:
        raise ValueError('"metrics-client-ca-file" requires "metrics-cert-dir"')
    from epp.tls import grpc_cipher_suites

    suites = grpc_cipher_suites(args.tls_min_version, args.tls_cipher_suites)  # refuses what cannot be honoured, TLS or not
    if suites and args.secure_serving:
        os.environ["GRPC_SSL_CIPHER_SUITES"] = suites  # gRPC reads it once, when it loads: before epp.server is imported
    for flag, default in DEPRECATED_METRIC_FLAGS.items():
        if getattr(args, flag) not in (default, *ALSO_READ.get(flag, ())):
            raise ValueError(f"--{flag.replace('_', '-')}={getattr(args, flag)} is not supported: this EPP reads vLLM's metric names "
                             f"({default}); llm-d refuses the flag too (use engineConfigs there)")
    warnings = [f"--{flag.replace('_', '-')}: {why}" for flag, why in NO_EFFECT_FLAGS.items() if getattr(args, flag)]
    if args.tls_min_version in ("VersionTLS10", "VersionTLS11"):
        warnings.append(f"--tls-min-version={args.tls_min_version}: gRPC here never negotiates below TLS 1.2")
    if args.refresh_metrics_interval < 0.05:
        warnings.append("--refresh-metrics-interval below the 50ms minimum; using 50ms")
        args.refresh_metrics_interval = 0.05
    return warnings


def log_settings(args: argparse.Namespace) -> tuple[int | None, bool]:
    """(level override, console) from --zap-log-level and --zap-encoder."""
    import logging

    level = None
    text = args.zap_log_level.strip().lower()
    if text in ("debug",):
        level = logging.DEBUG
    elif text == "info":
        level = logging.INFO
    elif text in ("error", "panic", "dpanic", "fatal"):
        level = logging.ERROR
    elif text.isdigit():
        level = logging.DEBUG if int(text) >= 3 else logging.INFO
    elif text:
        raise ValueError(f"invalid --zap-log-level {args.zap_log_level!r}; use debug, info, error or a number")
    return level, args.zap_encoder == "console"


def _auto_or_bool(value: str):
    return "auto" if value.strip().lower() == "auto" else go_bool(value)


def _add_access_and_limit_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("access and limits")
    g.add_argument("--metrics-endpoint-auth", type=_auto_or_bool, nargs="?", const=True, default="auto",
                   help="require a Kubernetes bearer token allowed to `get /metrics` (TokenReview + SubjectAccessReview), "
                        "as the Go EPP does; auto = on with --pool-name, off with --endpoints-file")
    g.add_argument("--admin-socket", default="auto",
                   help="Unix socket of the EndpointPickerAdmin API (`epp endpoints`), readable by this user only; "
                        "auto = $TMPDIR/epp-admin-<grpc-port>.sock; empty string: not served")
    g.add_argument("--max-buffered-body-bytes", type=int, default=256 * 1024 * 1024,
                   help="request bytes all streams may hold at once; beyond it requests get 429 (0 = unbounded)")
    g.add_argument("--trust-model-rewrite-header", type=go_bool, nargs="?", const=True, default=False,
                   help="honour x-gateway-model-name-rewrite / x-llm-d-model-name-rewrite (only when a gateway filter "
                        "in front of ext_proc sets it and strips the client's); it is always removed upstream")
    g.add_argument("--model-name-metric-label-limit", type=int, default=16,
                   help="distinct model names kept as metric labels; later names are reported as `other`")
    g.add_argument("--fairness-id-metric-label-limit", type=int, default=16,
                   help="distinct fairness ids kept as metric labels; later ids are reported as `other` (0: always `other`)")


def _access_and_limit_options(args: argparse.Namespace) -> dict:
    return dict(
        metrics_endpoint_auth=None if args.metrics_endpoint_auth == "auto" else args.metrics_endpoint_auth,
        admin_socket=None if args.admin_socket == "auto" else args.admin_socket,
        max_buffered_body_bytes=args.max_buffered_body_bytes,
        trust_model_rewrite_header=args.trust_model_rewrite_header,
        model_name_metric_label_limit=args.model_name_metric_label_limit,
        fairness_id_metric_label_limit=args.fairness_id_metric_label_limit,
    )


async def _serve(args: argparse.Namespace, warnings: list[str]) -> int:
    from epp.observability.logging import get_logger
    from epp.server import EPPServer, ServerOptions

    log = get_logger("epp")
    for w in warnings:
        log.warning("Flag has no effect here", flag=w)
    options = ServerOptions(
        grpc_port=args.grpc_port,
        grpc_health_port=args.grpc_health_port,
        metrics_port=args.metrics_port,
        bind_address=args.bind_address,
        pool_name=args.pool_name,
        pool_namespace=args.pool_namespace,
        config_file=args.config_file,
        config_text=args.config_text,
        config_profile=args.config_profile,
        endpoints_file=args.endpoints_file,
        kubeconfig=args.kubeconfig,
        secure_serving=args.secure_serving,
        cert_path=args.cert_path,
        max_request_body_bytes=args.max_request_body_bytes,
        request_timeout=args.request_timeout,
        disable_endpoint_subset_filter=args.disable_endpoint_subset_filter,
        refresh_metrics_interval=args.refresh_metrics_interval,
        metrics_staleness_threshold=args.metrics_staleness_threshold,
        **_access_and_limit_options(args),
        endpoint_selector=args.endpoint_selector,
        endpoint_target_ports=args.endpoint_target_ports,
        drain_timeout=args.drain_timeout,
        allow_experimental_plugins=args.allow_experimental_plugins,
        emit_endpoint_scores=args.emit_endpoint_scores,
        grpc_max_recv_msg_size=args.grpc_max_recv_msg_size,
        grpc_max_send_msg_size=args.grpc_max_send_msg_size,
        tls_min_version=args.tls_min_version,
        tls_cipher_suites=args.tls_cipher_suites,
        enable_cert_reload=args.enable_cert_reload,
        ha_enable_leader_election=args.ha_enable_leader_election,
        leader_election_timing=(args.leader_election_lease_duration, args.leader_election_renew_deadline, args.leader_election_retry_period),
        model_server_metrics_scheme=args.model_server_metrics_scheme,
        model_server_metrics_path=args.model_server_metrics_path,
        model_server_metrics_port=args.model_server_metrics_port,
        model_server_metrics_insecure_skip_verify=args.model_server_metrics_https_insecure_skip_verify,
        metrics_cert_dir=args.metrics_cert_dir,
        metrics_client_ca_file=args.metrics_client_ca_file,
    )
    server = EPPServer(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
    except BaseException:
        await server.stop(0)
        raise
    await stop.wait()
    await server.stop()
    return 0


def serve_main(argv: Sequence[str]) -> int:
    from epp.observability.logging import configure_logging
    from epp.scheduling.framework import ConfigError

    args = serve_parser().parse_args(normalize_go_flags(argv))
    try:
        level, console = log_settings(args)
        configure_logging(args.verbosity, component="epp", level=level, console=console)
        warnings = check_flags(args)
        return asyncio.run(_serve(args, warnings))
    except (ConfigError, ValueError, OSError) as e:
        print(f"epp: {e}", file=sys.stderr)
        return 2


def endpoints_main(argv: Sequence[str]) -> int:
    """Print a running EPP's endpoints with their live metrics and configuration (EndpointPickerAdmin)."""
    import grpc

    from epp.admin.v1 import admin_pb2, admin_pb2_grpc

    p = argparse.ArgumentParser(prog="epp endpoints", description=endpoints_main.__doc__)
    p.add_argument("--address", default=None,
                   help="the EPP's admin socket as a gRPC target (default: unix:$TMPDIR/epp-admin-<grpc-port>.sock)")
    p.add_argument("--grpc-port", type=int, default=9002, help="the EPP's --grpc-port, to find its default admin socket (default: %(default)s)")
    args = p.parse_args(list(argv))
    if args.address is None:
        from epp.server import default_admin_socket

        args.address = "unix:" + default_admin_socket(args.grpc_port)
    try:
        with grpc.insecure_channel(args.address) as ch:
            stub = admin_pb2_grpc.EndpointPickerAdminStub(ch)
            desc = stub.DescribeScheduler(admin_pb2.DescribeSchedulerRequest(), timeout=5)
            eps = stub.ListEndpoints(admin_pb2.ListEndpointsRequest(), timeout=5)
    except grpc.RpcError as e:
        print(f"epp endpoints: cannot reach the EPP at {args.address}: {e.code().name}", file=sys.stderr)
        return 2
    print(f"profile {desc.config_profile or '(custom)'} from {desc.source}; synced={eps.synced}")
    for prof in desc.profiles:
        scorers = ", ".join(f"{s.name}×{s.weight:g}" for s in prof.scorers) or "-"
        print(f"  {prof.name}: filters {list(prof.filters) or '-'}; scorers {scorers}; picker {prof.picker}")
    for e in eps.endpoints:
        fields = [f"{e.name:28} {e.address}:{e.port:<6} kv-backend={e.kv_backend or '-'}"]
        if e.HasField("metrics_age_seconds"):
            fields.append(f"age={e.metrics_age_seconds:.1f}s")
        for f in ("waiting", "running", "kv_cache_usage", "prefill_tokens_per_second"):
            if e.HasField(f):
                fields.append(f"{f}={getattr(e, f):g}")
        if e.transfer_profile:
            pts = e.transfer_profile
            fields.append(f"transfer {pts[0].blocks}→{pts[-1].blocks} blocks: {pts[0].seconds * 1000:.1f}→{pts[-1].seconds * 1000:.1f} ms")
        if e.scrape_error:
            fields.append(f"scrape_error={e.scrape_error!r}")
        print("  " + "  ".join(fields))
        if e.HasField("health"):
            print("    " + health_line(e.health))
    return 0


def health_line(h) -> str:
    """One line of endpoint health for `epp endpoints`."""
    state = h.state
    if state == "ejected":
        state += f" ({h.ejection_detail}; {h.ejected_for_seconds:.1f}s left)"
    elif state == "half_open":
        state += " (trial request in flight)" if h.trial_in_flight else " (next request is a trial)"
    parts = [f"health {state}"]
    if h.HasField("ready"):
        parts.append(f"ready={'yes' if h.ready else 'no'} ({h.readiness_detail})")
    for role, n in sorted(h.instances.items()):
        parts.append(f"{role} {n.up}/{n.total} up")
    if h.outcomes:
        parts.append("outcomes " + " ".join(f"{k}={v}" for k, v in sorted(h.outcomes.items(), key=lambda kv: -kv[1])))
    if h.ejections:
        parts.append("ejections " + " ".join(f"{k}={v}" for k, v in sorted(h.ejections.items())))
    if h.consecutive_5xx or h.consecutive_gateway_failures:
        parts.append(f"in a row: 5xx={h.consecutive_5xx} gateway={h.consecutive_gateway_failures}")
    if h.last_failure:
        age = f" {h.last_failure_age_seconds:.0f}s ago" if h.HasField("last_failure_age_seconds") else ""
        parts.append(f"last failure{age}: {h.last_failure}")
    if h.HasField("ttfb_seconds"):
        parts.append(f"ttfb {h.ttfb_seconds * 1000:.0f} ms")
    return "; ".join(parts)


USAGE = """usage: epp [serve] [flags]          run the endpoint picker (see `epp serve --help`)
       epp profiles list              named config profiles
       epp profiles show NAME         print a profile's YAML
       epp profiles validate FILE     check an EndpointPickerConfig (file:line errors)
       epp decisions [FILE|-]         summarise `Scoring decision` logs
       epp endpoints [--grpc-port P]  what a running EPP knows about its endpoints (admin API, local socket)
"""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv and argv[0] == "profiles":
        from epp.config.cli import profiles_main

        return profiles_main(argv[1:])
    if argv and argv[0] == "decisions":
        from epp.observability.decisions_summary import main as decisions_main

        return decisions_main(argv[1:])
    if argv and argv[0] == "endpoints":
        return endpoints_main(argv[1:])
    if argv and argv[0] == "serve":
        argv = argv[1:]
    return serve_main(argv)


__all__ = ["main", "serve_parser", "go_bool", "normalize_go_flags"]

if __name__ == "__main__":
    sys.exit(main())
