"""`dev-gateway`: an HTTP gateway that consults the EPP over ext_proc, as Envoy does.

For development on one machine only; production uses an Envoy-based Gateway (see deploy/).
"""

from __future__ import annotations

import argparse
import sys

from aiohttp import web

from dev_gateway.gateway import MODES, DevGateway, GatewayConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dev-gateway", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="listen address")
    p.add_argument("--port", type=int, default=18080, help="listen port")
    p.add_argument("--epp", default="127.0.0.1:9002", help="the EPP's ext_proc address")
    p.add_argument("--epp-tls", action="store_true", help="connect to the EPP over TLS (as with --secure-serving)")
    p.add_argument("--body-mode", choices=list(MODES), default="FULL_DUPLEX_STREAMED", help="ext_proc body processing mode")
    p.add_argument("--connect-timeout", type=float, default=5.0, help="seconds to connect to an endpoint before trying the next")
    args = p.parse_args(argv)
    gw = DevGateway(GatewayConfig(args.epp, args.body_mode, args.epp_tls, args.connect_timeout))
    print(f"dev-gateway on http://{args.host}:{args.port} → EPP {args.epp} ({args.body_mode}); "
          "for development only, production uses an Envoy-based Gateway (deploy/)", flush=True)
    web.run_app(gw.app(), host=args.host, port=args.port, access_log=None, print=None, handler_cancellation=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
