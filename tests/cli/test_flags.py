"""Flags as the Go EPP spells them, and the EPP staying free of torch."""

import subprocess
import sys

import pytest

from epp.cli import go_bool, normalize_go_flags, serve_parser


def test_go_style_flags_and_defaults():
    p = serve_parser()
    a = p.parse_args(normalize_go_flags(["-grpc-port=9102", "--secure-serving=false", "-v=3", "--pool-name", "pool", "--zap-encoder", "json", "--tracing=false"]))
    assert (a.grpc_port, a.secure_serving, a.verbosity, a.pool_name) == (9102, False, 3, "pool")
    d = p.parse_args([])
    assert (d.grpc_port, d.grpc_health_port, d.metrics_port, d.secure_serving, d.verbosity) == (9002, 9003, 9090, True, 2)
    assert p.parse_args(["--secure-serving"]).secure_serving is True
    for text, value in (("true", True), ("F", False), ("1", True), ("no", False)):
        assert go_bool(text) is value
    with pytest.raises(SystemExit):
        p.parse_args(["--secure-serving=maybe"])


def test_help_documents_every_flag_with_its_default():
    out = subprocess.run([sys.executable, "-m", "epp.cli", "serve", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--grpc-port", "--grpc-health-port", "--metrics-port", "--pool-name", "--pool-namespace", "--config-file",
                 "--config-text", "--config-profile", "--secure-serving", "--cert-path", "--endpoints-file", "--request-timeout"):
        assert flag in out
    assert "(default: 9002)" in out and "(default: True)" in out


def test_the_epp_does_not_import_torch_or_vllm():
    code = ("import sys, epp.server, epp.cli, filters, scorers, epp.discovery.kubernetes, epp.scrape; "
            "from epp.scheduling import registry; registry.load_plugins(); "
            "bad = [m for m in ('torch', 'vllm') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
