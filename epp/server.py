"""Assembles a running EPP: config → scheduler, discovery → datastore, ext_proc + health + metrics servers."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.admin.service import AdminService
from epp.admin.service import add_to_server as add_admin
from epp.config import build, resolve_config
from epp.datastore import Datastore
from epp.discovery.static_file import StaticFileDiscovery
from epp.extproc.director import Director
from epp.extproc.service import DEFAULT_BODY_BUDGET, DEFAULT_MAX_BODY, ExternalProcessor
from epp.health_server import MirroredHealth, ThreadedHealthServer
from epp.observability.logging import forward_stdlib_logger, get_logger
from epp.observability.metrics import DEFAULT_FAIRNESS_LABEL_LIMIT, DEFAULT_MODEL_LABEL_LIMIT, EPPMetrics
from epp.observability.metrics_server import MetricsEndpoint
from epp.scheduling.registry import PluginContext
from epp.util import memory

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
TRIM_AFTER_CHURN_BYTES = 16 * 1024 * 1024
log = get_logger("epp.server")


@dataclass
class ServerOptions:
    grpc_port: int = 9002
    grpc_health_port: int = 9003
    metrics_port: int = 9090
    bind_address: str = "0.0.0.0"
    pool_name: str = ""
    pool_namespace: str = "default"
    config_file: str | None = None
    config_text: str | None = None
    config_profile: str | None = None
    endpoints_file: str | None = None
    kubeconfig: str | None = None
    secure_serving: bool = True
    cert_path: str | None = None
    max_request_body_bytes: int = DEFAULT_MAX_BODY
    max_buffered_body_bytes: int = DEFAULT_BODY_BUDGET  # all streams together; 0 = unbounded
    trust_model_rewrite_header: bool = False
    model_name_metric_label_limit: int = DEFAULT_MODEL_LABEL_LIMIT
    metrics_endpoint_auth: bool | None = None  # None: on with Kubernetes discovery (--pool-name), off otherwise
    admin_socket: str | None = None  # EndpointPickerAdmin's Unix socket; None: the default path, "": not served
    fairness_id_metric_label_limit: int = DEFAULT_FAIRNESS_LABEL_LIMIT
    request_timeout: float = 600.0
    disable_endpoint_subset_filter: bool = False
    refresh_metrics_interval: float = 0.05
    metrics_staleness_threshold: float = 2.0


class EPPServer:
    def __init__(self, options: ServerOptions) -> None:
        self.options = o = options
        self.datastore = Datastore()
        self.metrics = EPPMetrics(pool_name=o.pool_name or "local", model_label_limit=o.model_name_metric_label_limit,
                                  fairness_label_limit=o.fairness_id_metric_label_limit)
        self.loaded = resolve_config(o.config_file, o.config_text, o.config_profile)
        ctx = PluginContext(datastore=self.datastore, services={"metrics_staleness": o.metrics_staleness_threshold})
        self.built = build(self.loaded, ctx, observer=self.metrics.observe_plugin)
        self.scheduler = self.built.scheduler
        self.director = Director(
            self.datastore,
            self.scheduler,
            self.metrics,
            config_profile=self.loaded.profile,
            request_timeout=o.request_timeout,
            disable_subset_filter=o.disable_endpoint_subset_filter,
        )
        self.processor = ExternalProcessor(self.director, o.max_request_body_bytes, o.max_buffered_body_bytes,
                                           o.trust_model_rewrite_header)
        self.admin = AdminService(self.datastore, self.loaded, self.scheduler)
        self.health = MirroredHealth()
        self._grpc: grpc.aio.Server | None = None
        self._health_grpc: ThreadedHealthServer | None = None
        self._admin_grpc: grpc.aio.Server | None = None
        self.admin_socket = ""
        self._metrics_runner: web.AppRunner | None = None
        self.metrics_authorizer: Any = None
        self._tasks: list[asyncio.Task] = []
        self.discovery: Any = None
        self.scraper: Any = None
        self.ports: dict[str, int] = {}

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        o = self.options
        memory.tune_allocator()
        forward_stdlib_logger("grpc")  # errors gRPC itself logs (a servicer exception) reach the JSON log
        creds = self._credentials() if o.secure_serving else None
        opts = [("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.http2.max_pings_without_data", 0)]
        self._grpc = grpc.aio.server(options=opts)
        pb_grpc.add_ExternalProcessorServicer_to_server(self.processor, self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        self.ports["grpc"] = self._bind(self._grpc, o.grpc_port, creds)
        self._health_grpc = ThreadedHealthServer(self.health)  # probes are answered even when the loop is busy
        self.ports["health"] = self._bind(self._health_grpc, o.grpc_health_port, None)
        self.metrics_authorizer = await self._metrics_authorizer()
        await self._set_health(False)
        await self._grpc.start()
        await self._health_grpc.start()
        await self._start_admin()
        self.ports["metrics"] = await self._start_metrics(o.metrics_port)
        await self._start_discovery()
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="epp-housekeeping"))
        # Everything built so far lives as long as the process: keep it out of the collector's scans,
        # and collect young objects less often (each request allocates a few hundred short-lived ones).
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        log.info(
            "EPP started",
            grpc_port=self.ports["grpc"],
            grpc_health_port=self.ports["health"],
            metrics_port=self.ports["metrics"],
            config=self.loaded.source,
            profile=self.loaded.profile,
            secure_serving=o.secure_serving,
            metrics_auth=self.metrics_authorizer is not None,
            admin_socket=self.admin_socket or None,
            scheduler=self.scheduler.describe(),
        )

    async def stop(self, grace: float = 2.0) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.scraper is not None:
            await self.scraper.stop()
        await self._set_health(False)
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self._health_grpc is not None:
            await self._health_grpc.stop(0)
        if self._admin_grpc is not None:
            await self._admin_grpc.stop(0)
            with contextlib.suppress(OSError):
                os.unlink(self.admin_socket)
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        if self.metrics_authorizer is not None:
            await self.metrics_authorizer.close()
        log.info("EPP stopped")

    async def wait_for_termination(self) -> None:
        assert self._grpc is not None
        await self._grpc.wait_for_termination()

    # -- parts ----------------------------------------------------------------------------------
    def _bind(self, server: Any, port: int, creds: grpc.ServerCredentials | None) -> int:
        addr = f"{self.options.bind_address}:{port}"
        bound = server.add_secure_port(addr, creds) if creds else server.add_insecure_port(addr)
        if not bound:
            raise OSError(f"cannot listen on {addr}; is the port in use? choose another with the matching --*-port flag")
        return bound

    def _credentials(self) -> grpc.ServerCredentials:
        o = self.options
        if o.cert_path:
            cert_dir = Path(o.cert_path)
            cert, key = cert_dir / "tls.crt", cert_dir / "tls.key"
            if not cert.is_file() or not key.is_file():
                raise FileNotFoundError(f"--cert-path {cert_dir} must contain tls.crt and tls.key")
            return grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
        key_pem, cert_pem = self_signed_certificate()
        return grpc.ssl_server_credentials([(key_pem, cert_pem)])

    async def _start_admin(self) -> None:
        """EndpointPickerAdmin (endpoints, labels, config) on a Unix socket only the EPP's user can open.

        It is not on the ext_proc or health ports: those are reachable from the network (Envoy,
        kubelet probes), and what the admin API shows is for operators (`kubectl exec … epp endpoints`).
        """
        path = self.options.admin_socket
        if path is None:
            path = default_admin_socket(self.ports["grpc"])
        if not path:
            return
        server = grpc.aio.server()
        add_admin(self.admin, server)
        old_umask = os.umask(0o177)  # the socket file is created 0600
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a socket left by a process that died
            server.add_insecure_port(f"unix:{path}")
        except (OSError, RuntimeError) as e:
            # Introspection is optional: serving traffic matters more than the admin socket.
            log.error("Admin API not served: cannot create its socket; give a writable path with --admin-socket",
                      path=path, error=str(e))
            return
        finally:
            os.umask(old_umask)
        await server.start()
        self._admin_grpc, self.admin_socket = server, path

    async def _metrics_authorizer(self):
        o = self.options
        wanted = o.metrics_endpoint_auth if o.metrics_endpoint_auth is not None else bool(o.pool_name and not o.endpoints_file)
        if not wanted:
            return None
        from epp.discovery.kubernetes import InferencePoolDiscovery
        from epp.observability.metrics_auth import KubernetesAuthorizer

        try:
            creds = await InferencePoolDiscovery(self.datastore, o.pool_name, o.pool_namespace, kubeconfig=o.kubeconfig)._credentials()
        except Exception as e:  # no kubeconfig, not in a cluster
            raise ValueError(
                f"--metrics-endpoint-auth needs the Kubernetes API to review scrapers' tokens, and none is reachable ({e}); "
                "run in a cluster or give --kubeconfig, or pass --metrics-endpoint-auth=false"
            ) from None
        return KubernetesAuthorizer(creds)

    async def _start_metrics(self, port: int) -> int:
        self.metrics.watch_pool(self.datastore.endpoints)
        self.metrics.watch_body_budget(self.processor.budget)
        self.metrics_endpoint = MetricsEndpoint(self.metrics.render, self.metrics_authorizer)
        self._metrics_runner = web.AppRunner(self.metrics_endpoint.app(), access_log=None)
        await self._metrics_runner.setup()
        site = web.TCPSite(self._metrics_runner, self.options.bind_address, port)
        await site.start()
        return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _start_discovery(self) -> None:
        o = self.options
        if o.endpoints_file:
            self.discovery = StaticFileDiscovery(self.datastore, o.endpoints_file)
            self.discovery.load()
            self._tasks.append(asyncio.create_task(self.discovery.run(), name="static-discovery"))
        elif o.pool_name:
            from epp.discovery.kubernetes import InferencePoolDiscovery

            self.discovery = InferencePoolDiscovery.from_environment(self.datastore, o.pool_name, o.pool_namespace, o.kubeconfig)
            self._tasks.append(asyncio.create_task(self.discovery.run(), name="inferencepool-discovery"))
        else:
            raise ValueError("no endpoint source: give --endpoints-file FILE (local) or --pool-name NAME (Kubernetes)")
        if self.scraper_wanted():
            from epp.scrape import MetricsScraper

            self.scraper = MetricsScraper(
                self.datastore, interval=o.refresh_metrics_interval, staleness=o.metrics_staleness_threshold
            )
            await self.scraper.start()

    def scraper_wanted(self) -> bool:
        """Scrape only when a configured plugin reads endpoint metrics (saves work for load-only profiles)."""
        return any(getattr(p, "needs_metrics", False) for p in self.built.plugins.values())

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", EXT_PROC_SERVICE, "inference-extension"):
            await self.health.set(service, status)

    async def _housekeeping(self) -> None:
        """Health follows the first discovery sync; stale per-request state is reaped."""
        serving = False
        while True:
            synced = self.datastore.synced
            if synced != serving:
                serving = synced
                await self._set_health(serving)
                log.info("Health", serving=serving, endpoints=len(self.datastore))
            self.director.reap_expired()
            budget = self.processor.budget
            if budget.churn >= TRIM_AFTER_CHURN_BYTES:
                # Large bodies came and went: gRPC's receive buffers and the bodies' pages are free but
                # still mapped. Give them back (in a thread: malloc_trim runs without the GIL).
                budget.churn = 0
                await asyncio.to_thread(memory.trim)
            await asyncio.sleep(0.2 if not serving else 1.0)


def default_admin_socket(grpc_port: int) -> str:
    """Where `epp serve` puts the admin socket, and where `epp endpoints` looks for it."""
    return os.path.join(tempfile.gettempdir(), f"epp-admin-{grpc_port}.sock")


def self_signed_certificate() -> tuple[bytes, bytes]:
    """(key PEM, cert PEM) for --secure-serving without --cert-path, as the Go EPP does."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "inference-epp")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


__all__ = ["EPPServer", "ServerOptions", "default_admin_socket", "self_signed_certificate"]
