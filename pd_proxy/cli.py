"""`pd-proxy`: serve the P/D proxy (deployed as vllm-p2p-proxy or vllm-fs-proxy)."""

from __future__ import annotations

import argparse
import sys

from aiohttp import web

from pd_proxy.instances import HealthPolicy
from pd_proxy.nixl import FAILURE_POLICIES
from pd_proxy.prefill_targets import PrefillAllowlist
from pd_proxy.proxy import MODES, Instance, PDProxy, ProxyConfig


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pd-proxy", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="0.0.0.0", help="listen address")
    p.add_argument("--port", type=int, default=8080, help="listen port")
    p.add_argument("--mode", choices=MODES, required=True,
                   help="vLLM KV connector protocol of the instances: nixl (NixlConnector), shared-storage (ExampleConnector), "
                        "p2p-nccl (P2pNcclConnector, vLLM before its removal in 2026-06)")
    p.add_argument("--prefill", action="append", default=[], metavar="URL[=KV_ADDR]", help="a prefill instance (repeat for several; none with --sidecar)")
    p.add_argument("--decode", action="append", default=[], metavar="URL[=KV_ADDR]", help="a decode instance (repeat for several)")
    p.add_argument("--kv-backend", default="", help="label value this proxy stands for (nvlink | fs), used in metrics")
    p.add_argument("--prefill-service", default="vllm-prefill", help="shared-storage: prefill name in request ids")
    p.add_argument("--decode-service", default="vllm-decode", help="shared-storage: decode name in request ids")
    p.add_argument("--connect-timeout", type=float, default=5.0, help="seconds to connect to an instance")
    p.add_argument("--prefill-timeout", type=float, default=300.0, help="seconds for the prefill leg")
    p.add_argument("--decode-timeout", type=float, default=3600.0, help="seconds for the decode leg")
    p.add_argument("--fallback-decode-only", action="store_true", help="when prefill fails, let decode compute the prompt")
    p.add_argument("--profile-file", default=None, help="KV-transfer profile JSON (kv-bandwidth-profiler) to publish")
    p.add_argument("--heartbeat-port", type=int, default=0,
                   help="accept instances registering by P2pNcclConnector heartbeats on this ZMQ port (0 = off; vLLM's proxy uses 30001)")
    p.add_argument("--kv-load-failure-policy", choices=FAILURE_POLICIES, default="recompute",
                   help="nixl: when the decode fails to load the KV, retry it on the decode without KV (it computes the prompt) or answer 502")
    p.add_argument("--shared-storage-path", default=None,
                   help="shared-storage: the connector's directory; entries written longer ago than --shared-storage-ttl are removed")
    p.add_argument("--shared-storage-ttl", type=float, default=3600.0,
                   help="seconds a shared-storage entry is kept after it was written (vLLM reuses an entry without touching it)")
    p.add_argument("--scrape-interval", type=float, default=1.0, help="seconds between instance health/metrics reads")
    g = p.add_argument_group("sidecar mode: the decode pod's sidecar, llm-d's layout (see docs/disaggregation.md)")
    g.add_argument("--sidecar", action="store_true",
                   help="serve one decode pod: --decode is the local vLLM; each request's prefill is the pod named in x-prefiller-host-port "
                        "(first value; absent or empty: the decode prefills itself)")
    g.add_argument("--endpoints-file", default=None,
                   help="sidecar: the EPP's endpoints file; its pods labelled llm-d.ai/role prefill, prefill-decode or both are the "
                        "prefill targets allowed (re-read when it changes)")
    g.add_argument("--prefill-allow", action="append", default=[], metavar="HOST:PORT",
                   help="sidecar: a prefill target allowed besides the endpoints file's (repeat); any other target is refused with 403")
    g.add_argument("--prefill-retries", type=int, default=1,
                   help="sidecar: further attempts on the named prefill after it failed (connect, reset, 5xx, timeout); then "
                        "--fallback-decode-only decides between a local prefill and an error")
    g.add_argument("--retry-backoff", type=float, default=0.05, help="sidecar: seconds before the first retry, doubled for each further one")
    g.add_argument("--live-profile-max-age", type=float, default=30.0,
                   help="sidecar: seconds a measured KV transfer stays in a peer's live profile (a link nobody uses is published no longer)")
    g.add_argument("--kv-block-tokens", type=int, default=16, help="sidecar: tokens per KV block, for the live per-peer transfer profiles")
    g = p.add_argument_group("instance health (see docs/backends.md)")
    d = HealthPolicy()
    g.add_argument("--health-timeout", type=float, default=d.health_timeout, help="seconds an instance's /health (and /metrics) may take")
    g.add_argument("--consecutive-failures", type=int, default=d.consecutive_failures,
                   help="failed calls in a row (5xx, lost connection, timeout, failed KV transfer) that eject an instance")
    g.add_argument("--base-ejection", type=float, default=d.base_ejection,
                   help="seconds of an instance's first ejection; each further one lasts this × its count")
    g.add_argument("--max-ejection", type=float, default=d.max_ejection, help="longest ejection, seconds")
    g.add_argument("--stall-timeout", type=float, default=d.stall_timeout,
                   help="an instance with calls in flight and no progress for this many seconds is hung: ejected, its calls end in 504 (0 = off)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        proxy = PDProxy(ProxyConfig(
            mode=args.mode, prefills=[Instance.parse(s) for s in args.prefill], decodes=[Instance.parse(s) for s in args.decode],
            kv_backend=args.kv_backend, prefill_service=args.prefill_service, decode_service=args.decode_service,
            connect_timeout=args.connect_timeout, prefill_timeout=args.prefill_timeout, decode_timeout=args.decode_timeout,
            fallback_decode_only=args.fallback_decode_only, profile_file=args.profile_file, scrape_interval=args.scrape_interval,
            heartbeat_port=args.heartbeat_port, kv_load_failure_policy=args.kv_load_failure_policy,
            shared_storage_path=args.shared_storage_path, shared_storage_ttl=args.shared_storage_ttl,
            sidecar=args.sidecar, prefill_retries=args.prefill_retries, retry_backoff=args.retry_backoff, kv_block_tokens=args.kv_block_tokens,
            live_profile_max_age=args.live_profile_max_age,
            allowlist=PrefillAllowlist(args.prefill_allow, args.endpoints_file) if args.sidecar else None,
            health=HealthPolicy(args.consecutive_failures, args.base_ejection, args.max_ejection, args.health_timeout, args.stall_timeout),
        ))
    except (ValueError, OSError) as e:
        print(f"pd-proxy: {e}", file=sys.stderr)
        return 2
    role = " sidecar" if args.sidecar else ""
    print(f"pd-proxy{role} {args.mode} ({args.kv_backend or '-'}) on http://{args.host}:{args.port}", flush=True)
    # handler_cancellation: a client that goes away cancels the handler, and with it both upstream legs
    web.run_app(proxy.app(), host=args.host, port=args.port, access_log=None, print=None, handler_cancellation=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
