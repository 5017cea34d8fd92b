"""The Go EPP's flags on a real `epp serve` process: drain, health services, standalone mode, TLS, message limits, refusals."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import ssl
import subprocess
import sys
import time

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2

from extproc_loadgen.envoy_flow import EnvoyStream
from local_stack.processes import ProcessGroup
from tests.cli.test_epp_process import ENDPOINTS, health_status, start
from tests.conftest import free_port, wait_until
from tests.kubernetes.fake_apiserver import ThreadedAPIServer, pod

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def run_epp(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epp.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_drain_on_sigterm_finishes_open_streams_and_refuses_new_ones(tmp_path):
    proc, ports, logfile = start(tmp_path, "--secure-serving=false", "--drain-timeout=20s")
    try:
        assert wait_until(lambda: health_status(ports["health"]) == SERVING, 45)
        for service in ("", "inference-extension", "liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
            assert health_status(ports["health"], service) == SERVING, service  # without leader election every name answers

        async def scenario() -> tuple[float, bool]:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['grpc']}") as ch:
                stub = pb_grpc.ExternalProcessorStub(ch)
                open_stream = EnvoyStream(stub)
                assert (await open_stream.send_request({":path": "/v1/chat/completions"}, BODY)).destination
                proc.send_signal(signal.SIGTERM)
                t0 = time.monotonic()
                while health_status(ports["health"], "readiness") != NOT_SERVING and time.monotonic() - t0 < 5:
                    await asyncio.sleep(0.02)
                not_serving_after = time.monotonic() - t0
                # a new stream is refused while the open one is draining
                refused = False
                try:
                    late = EnvoyStream(stub)
                    res = await asyncio.wait_for(late.send_request({":path": "/v1/chat/completions"}, BODY), 5)
                    refused = res.destination is None
                except (grpc.aio.AioRpcError, asyncio.TimeoutError):
                    refused = True
                # the open stream still completes its response
                res = await open_stream.send_response(200, [b'{"usage":{"prompt_tokens":1,"completion_tokens":1}}'])
                await open_stream.close()
                assert res.response_body
                return not_serving_after, refused

        not_serving_after, refused = asyncio.run(scenario())
        assert not_serving_after < 1.0 and refused
        started = time.monotonic()
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - started < 10  # it did not wait out the 20s drain once the stream ended
    finally:
        if proc.poll() is None:
            proc.kill()
    assert '"Draining"' in logfile.read_text()


def test_drain_timeout_bounds_a_stream_that_never_ends(tmp_path):
    proc, ports, _ = start(tmp_path, "--secure-serving=false", "--drain-timeout=1s")
    try:
        assert wait_until(lambda: health_status(ports["health"]) == SERVING, 45)

        async def hold() -> float:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['grpc']}") as ch:
                s = EnvoyStream(pb_grpc.ExternalProcessorStub(ch))
                assert (await s.send_request({":path": "/v1/chat/completions"}, BODY)).destination
                proc.send_signal(signal.SIGTERM)
                t0 = time.monotonic()
                while proc.poll() is None and time.monotonic() - t0 < 15:
                    await asyncio.sleep(0.05)
                return time.monotonic() - t0

        took = asyncio.run(hold())
        assert proc.returncode == 0 and 0.8 < took < 8, took
    finally:
        if proc.poll() is None:
            proc.kill()


def test_standalone_mode_discovers_pods_by_label_without_an_inferencepool(tmp_path):
    api = ThreadedAPIServer(tmp_path)
    for name, ip, labels in (("vllm-0", "10.0.0.1", {"app": "vllm", "tier": "gold"}), ("vllm-1", "10.0.0.2", {"app": "vllm", "tier": "free"}),
                             ("other", "10.0.0.3", {"app": "other"})):
        api.call(api.server.put, pod(name, ip, labels))
    procs = ProcessGroup(tmp_path / "logs")
    ports = [free_port() for _ in range(3)]
    try:
        procs.start("epp", ["epp.cli", "--endpoint-selector", "app=vllm,tier in (gold,silver)", "--endpoint-target-ports=8000,8001",
                            "--pool-namespace", "llm", "--kubeconfig", api.kubeconfig, "--secure-serving=false", "--bind-address", "127.0.0.1",
                            f"--grpc-port={ports[0]}", f"--grpc-health-port={ports[1]}", f"--metrics-port={ports[2]}"])
        assert wait_until(lambda: health_status(ports[1]) == SERVING, 30)
        out = run_epp("endpoints", f"--grpc-port={ports[0]}").stdout
        assert "10.0.0.1:8000" in out and "10.0.0.1:8001" in out and "10.0.0.2" not in out and "10.0.0.3" not in out
        assert api.server.pool is None  # no InferencePool was needed
        api.call(api.server.put, pod("vllm-2", "10.0.0.4", {"app": "vllm", "tier": "silver"}))
        assert wait_until(lambda: "10.0.0.4:8001" in run_epp("endpoints", f"--grpc-port={ports[0]}").stdout, 20)
    finally:
        procs.stop()
        api.stop()


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--endpoint-target-ports=8000"], "--endpoint-target-ports needs --endpoint-selector"),
        (["--pool-name", "p", "--endpoint-selector", "app=vllm"], "not both"),
        (["--tls-min-version=VersionTLS13"], "VersionTLS13 cannot be enforced"),
        (["--tls-min-version=TLS1.2"], "invalid --tls-min-version"),
        (["--tls-cipher-suites=TLS_FOO"], "invalid --tls-cipher-suites entry 'TLS_FOO'"),
        (["--total-queued-requests-metric=my_queue"], "--total-queued-requests-metric=my_queue is not supported"),
        (["--pool-group=inference.networking.x-k8s.io"], "--pool-group"),
        (["--metrics-client-ca-file=/tmp/ca.pem"], "requires \"metrics-cert-dir\""),
        (["--config-file=a.yaml", "--config-text=b"], "cannot be set at the same time"),
    ],
)
def test_go_flag_refusals(args, fragment):
    from epp.cli import check_flags, normalize_go_flags, serve_parser

    with pytest.raises(ValueError) as e:
        check_flags(serve_parser().parse_args(normalize_go_flags(args)))
    assert fragment in str(e.value)


def test_flags_without_effect_here_are_warned_and_gie_metric_names_accepted():
    from epp.cli import check_flags, serve_parser

    warnings = check_flags(serve_parser().parse_args(["--tracing", "--enable-pprof=true",
                                                      "--kv-cache-usage-percentage-metric=vllm:gpu_cache_usage_perc",
                                                      "--tls-min-version=VersionTLS11"]))
    text = "\n".join(warnings)
    for flag in ("--tracing", "--enable-pprof", "--tls-min-version=VersionTLS11"):
        assert flag in text


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--tls-min-version=VersionTLS13"], "VersionTLS13 cannot be enforced"),  # refused before anything starts
        (["--endpoint-selector", "app in ()", "--endpoint-target-ports=8000"], "--endpoint-selector"),
        (["--endpoint-selector", "app=vllm", "--endpoint-target-ports=1,2,3,4,5,6,7,8,9"], "1 to 8 ports"),
        (["--grpc-max-recv-msg-size=lots"], "invalid size"),  # argparse
    ],
)
def test_refusals_exit_2_with_a_message(tmp_path, args, fragment):
    eps = tmp_path / "e.yaml"
    eps.write_text(ENDPOINTS)
    base = [] if any(a.startswith("--endpoint-selector") for a in args) else ["--endpoints-file", str(eps)]
    r = run_epp(*base, "--secure-serving=false", f"--grpc-port={free_port()}", f"--grpc-health-port={free_port()}",
                f"--metrics-port={free_port()}", *args)
    assert r.returncode == 2 and fragment in r.stderr, r.stderr[-2000:]


def _handshake(port: int, cipher: str) -> str:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(cipher)
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as sock, ctx.wrap_socket(sock, server_hostname="localhost") as s:
            return s.cipher()[0]
    except (ssl.SSLError, OSError):
        return "refused"


def test_tls_cipher_suites_and_message_size_limits(tmp_path):
    proc, ports, _ = start(tmp_path, "--tls-cipher-suites=TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", "--tls-min-version=VersionTLS12",
                           "--grpc-max-recv-msg-size=2KiB")
    try:
        assert wait_until(lambda: health_status(ports["health"]) == SERVING, 45)
        assert _handshake(ports["grpc"], "ECDHE-ECDSA-AES256-GCM-SHA384") == "ECDHE-ECDSA-AES256-GCM-SHA384"
        assert _handshake(ports["grpc"], "ECDHE-ECDSA-AES128-GCM-SHA256") == "refused"  # not in the configured list
        pem = ssl.get_server_certificate(("127.0.0.1", ports["grpc"])).encode()

        async def big_and_small() -> tuple[object, object]:
            creds = grpc.ssl_channel_credentials(root_certificates=pem)
            async with grpc.aio.secure_channel(f"127.0.0.1:{ports['grpc']}", creds, options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
                stub = pb_grpc.ExternalProcessorStub(ch)
                small = await EnvoyStream(stub).send_request({":path": "/v1/chat/completions"}, BODY)
                big_body = json.dumps({"model": "m", "prompt": "x" * 8000}).encode()
                big = await EnvoyStream(stub).send_request({":path": "/v1/completions"}, big_body, chunk=8192)
                return small, big

        small, big = asyncio.run(big_and_small())
        assert small.destination and big.destination is None  # the 8 KB message exceeds --grpc-max-recv-msg-size
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def _write_cert(directory, org: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import datetime

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    (directory / "tls.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _served_org(port: int) -> str:
    from cryptography import x509

    pem = ssl.get_server_certificate(("127.0.0.1", port))
    return x509.load_pem_x509_certificate(pem.encode()).subject.rfc4514_string()


def test_cert_reload_and_metrics_over_tls(tmp_path):
    import urllib.request

    certs, metrics_certs = tmp_path / "certs", tmp_path / "metrics-certs"
    certs.mkdir()
    metrics_certs.mkdir()
    _write_cert(certs, "first")
    _write_cert(metrics_certs, "metrics")
    proc, ports, _ = start(tmp_path, f"--cert-path={certs}", "--enable-cert-reload", f"--metrics-cert-dir={metrics_certs}")
    try:
        assert wait_until(lambda: health_status(ports["health"]) == SERVING, 45)
        assert _served_org(ports["grpc"]) == "O=first"
        time.sleep(0.05)
        _write_cert(certs, "second")  # rotated on disk: new connections get the new pair
        assert wait_until(lambda: _served_org(ports["grpc"]) == "O=second", 10)
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        body = urllib.request.urlopen(f"https://127.0.0.1:{ports['metrics']}/metrics", context=ctx, timeout=5).read().decode()
        assert "inference_pool_ready_pods" in body
        assert _served_org(ports["metrics"]) == "O=metrics"
    finally:
        proc.terminate()
        proc.wait(timeout=15)
