"""Assembles a running EPP: config → scheduler, discovery → datastore, ext_proc + health + metrics servers."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from epp.admin.service import AdminService
from epp.admin.service import add_to_server as add_admin
from epp.config import build, resolve_config
from epp.datastore import Datastore
from epp.discovery.static_file import StaticFileDiscovery
from epp.extproc.director import Director
from epp.extproc.service import DEFAULT_MAX_BODY, ExternalProcessor
from epp.observability.logging import get_logger
from epp.observability.metrics import EPPMetrics
from epp.scheduling.framework import Background
from epp.scheduling.registry import PluginContext

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
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
    request_timeout: float = 600.0
    disable_endpoint_subset_filter: bool = False
    refresh_metrics_interval: float = 0.05
    metrics_staleness_threshold: float = 2.0


class EPPServer:
    def __init__(self, options: ServerOptions) -> None:
        self.options = o = options
        self.datastore = Datastore()
        self.metrics = EPPMetrics(pool_name=o.pool_name or "local")
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
        self.processor = ExternalProcessor(self.director, o.max_request_body_bytes)
        self.admin = AdminService(self.datastore, self.loaded, self.scheduler)
        self.health = health_aio.HealthServicer()
        self._grpc: grpc.aio.Server | None = None
        self._health_grpc: grpc.aio.Server | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task] = []
        self.discovery: Any = None
        self.scraper: Any = None
        self.ports: dict[str, int] = {}

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        o = self.options
        creds = self._credentials() if o.secure_serving else None
        opts = [("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.http2.max_pings_without_data", 0)]
        self._grpc = grpc.aio.server(options=opts)
        pb_grpc.add_ExternalProcessorServicer_to_server(self.processor, self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        add_admin(self.admin, self._grpc)
        self.ports["grpc"] = self._bind(self._grpc, o.grpc_port, creds)
        self._health_grpc = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_grpc)
        add_admin(self.admin, self._health_grpc)
        self.ports["health"] = self._bind(self._health_grpc, o.grpc_health_port, None)
        await self._set_health(False)
        await self._grpc.start()
        await self._health_grpc.start()
        self.ports["metrics"] = await self._start_metrics(o.metrics_port)
        await self._start_discovery()
        for plugin in self._background_plugins():
            plugin.start_background(self.datastore)
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
        for plugin in self._background_plugins():
            plugin.stop_background()
        await self._set_health(False)
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self._health_grpc is not None:
            await self._health_grpc.stop(0)
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        log.info("EPP stopped")

    async def wait_for_termination(self) -> None:
        assert self._grpc is not None
        await self._grpc.wait_for_termination()

    # -- parts ----------------------------------------------------------------------------------
    def _bind(self, server: grpc.aio.Server, port: int, creds: grpc.ServerCredentials | None) -> int:
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

    async def _start_metrics(self, port: int) -> int:
        registry = self.metrics.registry

        async def metrics(_request: web.Request) -> web.Response:
            self.metrics.update_pool(self.datastore.endpoints())
            return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        self._metrics_runner = web.AppRunner(app, access_log=None)
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

    def _background_plugins(self) -> list[Background]:
        return [p for p in self.built.plugins.values() if isinstance(p, Background)]

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
            await asyncio.sleep(0.2 if not serving else 1.0)


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


__all__ = ["EPPServer", "ServerOptions", "self_signed_certificate"]
