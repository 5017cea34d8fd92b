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
from typing import Sequence

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


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="epp serve",
        description="Run the endpoint picker: an Envoy ext_proc server that routes each LLM request to a P/D proxy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("servers")
    g.add_argument("--grpc-port", type=int, default=9002, help="ext_proc gRPC port")
    g.add_argument("--grpc-health-port", type=int, default=9003, help="gRPC health port (grpc.health.v1)")
    g.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics port")
    g.add_argument("--bind-address", default="0.0.0.0", help="address every server listens on")
    g.add_argument("--secure-serving", type=go_bool, nargs="?", const=True, default=True,
                   help="serve ext_proc over TLS (self-signed unless --cert-path)")
    g.add_argument("--cert-path", default=None, help="directory holding tls.crt and tls.key for --secure-serving")
    g.add_argument("-v", "--v", dest="verbosity", type=int, default=2, help="log verbosity: 2 info, 3+ debug")
    _add_access_and_limit_flags(p)
    g = p.add_argument_group("endpoints")
    g.add_argument("--endpoints-file", default=None, help="static endpoints YAML (reloaded on change); the local default")
    g.add_argument("--pool-name", default="", help="InferencePool to discover endpoints from (Kubernetes)")
    g.add_argument("--pool-namespace", default=os.environ.get("NAMESPACE", "default"), help="namespace of the InferencePool")
    g.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster, then ~/.kube/config)")
    g.add_argument("--disable-endpoint-subset-filter", type=go_bool, nargs="?", const=True, default=False,
                   help="ignore Envoy's envoy.lb.subset_hint")
    g = p.add_argument_group("scheduling")
    g.add_argument("--config-file", default=None, help="EndpointPickerConfig YAML file")
    g.add_argument("--config-text", default=None, help="EndpointPickerConfig YAML given inline")
    g.add_argument("--config-profile", default=os.environ.get("EPP_CONFIG_PROFILE"),
                   help="named profile from profiles/ (env EPP_CONFIG_PROFILE; `default` when nothing is given)")
    g.add_argument("--max-request-body-bytes", type=int, default=16 * 1024 * 1024,
                   help="larger request bodies are refused with 413 without being buffered")
    g.add_argument("--request-timeout", type=_duration, default="10m",
                   help="per-request state is released after this long even if the stream never ends (Go duration)")
    g.add_argument("--refresh-metrics-interval", type=_duration, default="50ms",
                   help="how often endpoint /metrics are scraped, when a plugin needs them (Go duration)")
    g.add_argument("--metrics-staleness-threshold", type=_duration, default="2s",
                   help="endpoint metrics older than this are reported stale (Go duration)")
    g = p.add_argument_group("Go EPP compatibility", "accepted so existing Deployments (Helm, SchedulerInstall) start unchanged; no effect here")
    for flag, default in (("--pool-group", "inference.networking.k8s.io"), ("--zap-encoder", "json"), ("--zap-log-level", "info"),
                          ("--kv-cache-usage-percentage-metric", "vllm:kv_cache_usage_perc"), ("--total-queued-requests-metric", "vllm:num_requests_waiting"),
                          ("--total-running-requests-metric", "vllm:num_requests_running"), ("--model-server-metrics-scheme", "http"),
                          ("--model-server-metrics-path", "/metrics"), ("--model-server-metrics-port", "0"),
                          ("--refresh-prometheus-metrics-interval", "5s")):
        g.add_argument(flag, default=default, help=f"(compatibility) default {default}")
    for flag, default in (("--tracing", False), ("--health-checking", False), ("--enable-pprof", False),
                          ("--ha-enable-leader-election", False), ("--enable-cert-reload", False), ("--zap-devel", False)):
        g.add_argument(flag, type=go_bool, nargs="?", const=True, default=default, help="(compatibility) Go-style boolean")
    return p


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


async def _serve(args: argparse.Namespace) -> int:
    from epp.server import EPPServer, ServerOptions

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
    )
    server = EPPServer(options)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
    return 0


def serve_main(argv: Sequence[str]) -> int:
    from epp.observability.logging import configure_logging
    from epp.scheduling.framework import ConfigError

    args = serve_parser().parse_args(normalize_go_flags(argv))
    configure_logging(args.verbosity, component="epp")
    try:
        return asyncio.run(_serve(args))
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
    return 0


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
