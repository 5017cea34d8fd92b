"""`pd-proxy`: serve the P/D proxy (deployed as vllm-p2p-proxy or vllm-fs-proxy)."""

from __future__ import annotations

import argparse
import sys

from aiohttp import web

from pd_proxy.instances import HealthPolicy
from pd_proxy.proxy import MODES, Instance, PDProxy, ProxyConfig


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pd-proxy", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="0.0.0.0", help="listen address")
    p.add_argument("--port", type=int, default=8080, help="listen port")
    p.add_argument("--mode", choices=MODES, required=True, help="vLLM KV connector protocol of the instances")
    p.add_argument("--prefill", action="append", default=[], metavar="URL[=KV_ADDR]", help="a prefill instance (repeat for several)")
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
    p.add_argument("--scrape-interval", type=float, default=1.0, help="seconds between instance health/metrics reads")
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
            heartbeat_port=args.heartbeat_port,
            health=HealthPolicy(args.consecutive_failures, args.base_ejection, args.max_ejection, args.health_timeout, args.stall_timeout),
        ))
    except (ValueError, OSError) as e:
        print(f"pd-proxy: {e}", file=sys.stderr)
        return 2
    print(f"pd-proxy {args.mode} ({args.kv_backend or '-'}) on http://{args.host}:{args.port}", flush=True)
    # handler_cancellation: a client that goes away cancels the handler, and with it both upstream legs
    web.run_app(proxy.app(), host=args.host, port=args.port, access_log=None, print=None, handler_cancellation=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
