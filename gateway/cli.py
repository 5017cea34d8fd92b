"""`epp-gateway`: real Envoy in front of the EPP, configured from the project's one template.

    epp-gateway up --epp 127.0.0.1:9002             Envoy on :18080 asking that EPP (Ctrl-C stops it)
    epp-gateway config --target kubernetes          print the config deploy/envoy/envoy.yaml is generated from
    epp-gateway validate deploy/envoy/envoy.yaml    check a config with the real binary (envoy --mode validate)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from gateway.envoy_binary import envoy_binary, validate
from gateway.envoy_config import BODY_MODES, DEFAULT_MAX_BODY, HEADER, EnvoySettings, render_yaml


def _settings_flags(p: argparse.ArgumentParser, port: int, epp: str | None) -> None:
    p.add_argument("--port", type=int, default=port, help="Envoy's listener port, where clients send requests (default: %(default)s)")
    p.add_argument("--admin-port", type=int, default=9901, help="Envoy's admin API port (/stats, /clusters, /ready), on 127.0.0.1 (default: %(default)s)")
    p.add_argument("--epp", action="append", default=None, metavar="HOST:PORT",
                   help=f"an EPP replica's ext_proc address; repeat for several (default: {epp})")
    p.add_argument("--epp-tls", action=argparse.BooleanOptionalAction, default=None,
                   help="speak TLS to the EPP, as with `epp serve --secure-serving` (default: on for kubernetes, off for local)")
    p.add_argument("--body-mode", choices=BODY_MODES, default="FULL_DUPLEX_STREAMED",
                   help="ext_proc request body mode; the EPP refuses STREAMED for requests with a body (default: %(default)s)")
    p.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY,
                   help="Envoy's buffer limit; keep it equal to `epp serve --max-request-body-bytes` (default: %(default)s)")


def _settings(args: argparse.Namespace, target: str) -> EnvoySettings:
    common = {"body_mode": args.body_mode, "max_request_body_bytes": args.max_request_body_bytes}
    if target == "kubernetes":
        s = replace(EnvoySettings.kubernetes(), listen_port=args.port, admin_port=args.admin_port, **common)
    else:
        s = EnvoySettings.local(args.port, args.admin_port, [9002], **common)
    if args.epp:
        s = replace(s, epp=args.epp)
    if args.epp_tls is not None:
        s = replace(s, epp_tls=args.epp_tls)
    return s


def cmd_config(args: argparse.Namespace) -> int:
    s = _settings(args, args.target)
    sys.stdout.write(render_yaml(s, HEADER if args.target == "kubernetes" else ""))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.files:
        try:
            print(validate(path))
        except (ValueError, FileNotFoundError) as e:
            print(e, file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def cmd_up(args: argparse.Namespace) -> int:
    s = _settings(args, "local")
    s = replace(s, listen_address=args.host)
    path = Path(args.config_out) if args.config_out else Path(tempfile.mkdtemp(prefix="epp-gateway-")) / "envoy.yaml"
    path.write_text(render_yaml(s))
    binary = envoy_binary()
    print(f"epp-gateway: Envoy on http://{args.host}:{s.listen_port} → EPP {', '.join(s.epp)} ({s.body_mode}); "
          f"admin and stats http://127.0.0.1:{s.admin_port}/stats; config {path}", flush=True)
    os.execv(binary, [binary, "-c", str(path), "--log-level", args.log_level, "--disable-hot-restart"])
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="epp-gateway", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    fmt = argparse.HelpFormatter
    u = sub.add_parser("up", help="run Envoy in the foreground in front of running EPP replicas", formatter_class=fmt)
    _settings_flags(u, 18080, "127.0.0.1:9002")
    u.add_argument("--host", default="127.0.0.1", help="Envoy's listener address (default: %(default)s)")
    u.add_argument("--config-out", default=None, help="write the rendered config here (default: a new temporary directory)")
    u.add_argument("--log-level", default="warning", help="Envoy's log level: trace, debug, info, warning, error (default: %(default)s)")
    c = sub.add_parser("config", help="print a rendered Envoy config", formatter_class=fmt)
    c.add_argument("--target", choices=("kubernetes", "local"), default="kubernetes",
                   help="kubernetes: the EPP Service over TLS (deploy/envoy/envoy.yaml); local: 127.0.0.1, plaintext (default: %(default)s)")
    _settings_flags(c, 8081, "inference-epp.llm-d.svc.cluster.local:9002 (kubernetes), 127.0.0.1:9002 (local)")
    v = sub.add_parser("validate", help="check Envoy configs with the real binary", formatter_class=fmt)
    v.add_argument("files", nargs="+", help="Envoy bootstrap config files (YAML or JSON)")
    args = p.parse_args(argv)
    try:
        return {"up": cmd_up, "config": cmd_config, "validate": cmd_validate}[args.cmd](args)
    except (FileNotFoundError, ValueError) as e:
        print(f"epp-gateway: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
