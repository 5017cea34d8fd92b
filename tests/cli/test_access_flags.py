"""The access and limit flags parse the Go way and reach the server's options."""

from epp.cli import _access_and_limit_options, normalize_go_flags, serve_parser


def test_defaults_are_auto_and_documented():
    opts = _access_and_limit_options(serve_parser().parse_args([]))
    assert opts == {"metrics_endpoint_auth": None, "admin_socket": None, "max_buffered_body_bytes": 256 * 1024 * 1024,
                    "trust_model_rewrite_header": False, "model_name_metric_label_limit": 16, "fairness_id_metric_label_limit": 16}


def test_explicit_values():
    args = serve_parser().parse_args(normalize_go_flags([
        "--metrics-endpoint-auth=false", "--admin-socket=", "-max-buffered-body-bytes=1024", "--trust-model-rewrite-header",
        "--model-name-metric-label-limit", "3", "--fairness-id-metric-label-limit=0"]))
    opts = _access_and_limit_options(args)
    assert opts == {"metrics_endpoint_auth": False, "admin_socket": "", "max_buffered_body_bytes": 1024,
                    "trust_model_rewrite_header": True, "model_name_metric_label_limit": 3, "fairness_id_metric_label_limit": 0}
    assert _access_and_limit_options(serve_parser().parse_args(["--metrics-endpoint-auth"]))["metrics_endpoint_auth"] is True
