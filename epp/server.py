"""Assembles a running EPP: config → scheduler, discovery → datastore, ext_proc + health + metrics servers.

Also the Go EPP's process behaviour: leader election (only the leader is ready), the drain on
shutdown (NOT_SERVING at once, open streams finish within --drain-timeout, no new ones), TLS
options and gRPC message limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from epp.admin.service import AdminService
from epp.admin.service import add_to_server as add_admin
from epp.config import build, resolve_config
from epp.datastore import Datastore
from epp.datastore.objectives import Objectives
from epp.discovery.static_file import StaticFileDiscovery
from epp.extproc.director import Director
from epp.endpoint_health import HealthMonitor
from epp.endpoint_health.collector import HealthCollector
from epp.extproc.service import DEFAULT_BODY_BUDGET, DEFAULT_MAX_BODY, ExternalProcessor
from epp.health import EXT_PROC_SERVICE, HealthService
from epp.health import add_to_server as add_health
from epp.health_server import ThreadedHealthServer
from epp.observability.logging import forward_stdlib_logger, get_logger
from epp.observability.metrics import DEFAULT_FAIRNESS_LABEL_LIMIT, DEFAULT_MODEL_LABEL_LIMIT, EPPMetrics
from epp.observability.metrics_server import MetricsEndpoint
from epp.scheduling.framework import Background
from epp.scheduling.registry import PluginContext
from epp.tls import grpc_cipher_suites
from epp.util import memory

TRIM_AFTER_CHURN_BYTES = 16 * 1024 * 1024
log = get_logger("epp.server")
DEFAULT_MAX_RECV = 64 * 1024 * 1024  # ext_proc body chunks; a BUFFERED body arrives in one message


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
    # standalone mode: pods by label, no InferencePool
    endpoint_selector: str = ""
    endpoint_target_ports: list[int] = field(default_factory=list)
    # Go EPP process behaviour
    drain_timeout: float = 30.0
    allow_experimental_plugins: bool = False
    emit_endpoint_scores: bool = False
    grpc_max_recv_msg_size: int | None = None
    grpc_max_send_msg_size: int | None = None
    tls_min_version: str = ""
    tls_cipher_suites: list[str] = field(default_factory=list)
    enable_cert_reload: bool = False
    ha_enable_leader_election: bool = False
    leader_election_timing: tuple[float, float, float] = (15.0, 10.0, 2.0)  # lease duration, renew deadline, retry period
    model_server_metrics_scheme: str | None = None  # deprecated GIE flags: defaults for metrics-data-source
    model_server_metrics_path: str | None = None
    model_server_metrics_port: int = 0
    model_server_metrics_insecure_skip_verify: bool | None = None
    objective_poll_interval: float = 5.0
    metrics_cert_dir: str = ""  # /metrics over TLS (tls.crt, tls.key)
    metrics_client_ca_file: str = ""  # ... requiring client certificates signed by this CA


class EPPServer:
    def __init__(self, options: ServerOptions) -> None:
        self.options = o = options
        self.datastore = Datastore()
        self.objectives = Objectives()
        self.metrics = EPPMetrics(pool_name=o.pool_name or "local", model_label_limit=o.model_name_metric_label_limit,
                                  fairness_label_limit=o.fairness_id_metric_label_limit)
        self.loaded = resolve_config(o.config_file, o.config_text, o.config_profile)
        ctx = PluginContext(datastore=self.datastore, services={"metrics_staleness": o.metrics_staleness_threshold,
                                                                "metrics_registry": self.metrics.registry})
        self.built = build(self.loaded, ctx, observer=self.metrics.observe_plugin, allow_experimental=o.allow_experimental_plugins)
        self.scheduler = self.built.scheduler
        # Endpoint health is on unless the config's endpoint-health plugin says `enabled: false`.
        configured = [p for p in self.built.plugins.values() if isinstance(p, HealthMonitor)]
        self.endpoint_health = configured[0] if configured else HealthMonitor()
        self.endpoint_health_configured = bool(configured)
        self.metrics.registry.register(HealthCollector(self.endpoint_health))
        self.director = Director(
            self.datastore,
            self.scheduler,
            self.metrics,
            config_profile=self.loaded.profile,
            request_timeout=o.request_timeout,
            disable_subset_filter=o.disable_endpoint_subset_filter,
            parsers=self.built.parsers,
            objectives=self.objectives,
            saturation_detector=self.built.saturation_detector,
            emit_endpoint_scores=o.emit_endpoint_scores,
            health=self.endpoint_health,
        )
        self.flow_control: Any = None
        self.flow_metrics: Any = None
        if self.built.flow_control is not None:
            from epp.flowcontrol.controller import FlowController
            from epp.flowcontrol.metrics import FlowControlMetrics

            self.flow_metrics = FlowControlMetrics(self.metrics.registry, o.pool_name or "local")
            self.flow_control = FlowController(self.built.flow_control, self.director.candidates, on_outcome=self.flow_metrics.outcome)
            self.director.flow_control = self.flow_control
        self.processor = ExternalProcessor(self.director, o.max_request_body_bytes, o.max_buffered_body_bytes,
                                           o.trust_model_rewrite_header)
        self.admin = AdminService(self.datastore, self.loaded, self.scheduler, self.endpoint_health)
        self.leader_election: Any = None
        self.health = HealthService(lambda: self.datastore.synced, self._is_leader if o.ha_enable_leader_election else None)
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
        opts = [("grpc.max_receive_message_length", o.grpc_max_recv_msg_size or DEFAULT_MAX_RECV), ("grpc.http2.max_pings_without_data", 0)]
        if o.grpc_max_send_msg_size:
            opts.append(("grpc.max_send_message_length", o.grpc_max_send_msg_size))
        self._grpc = grpc.aio.server(options=opts)
        pb_grpc.add_ExternalProcessorServicer_to_server(self.processor, self._grpc)
        add_health(self.health, self._grpc)
        self.ports["grpc"] = self._bind(self._grpc, o.grpc_port, creds)
        self._health_grpc = ThreadedHealthServer(self.health)  # probes are answered even when the loop is busy
        self.ports["health"] = self._bind(self._health_grpc, o.grpc_health_port, None)
        self.metrics_authorizer = await self._metrics_authorizer()
        await self._grpc.start()
        await self._health_grpc.start()
        await self._start_admin()
        self.ports["metrics"] = await self._start_metrics(o.metrics_port)
        if o.ha_enable_leader_election:
            self._start_leader_election()
        await self._start_discovery()
        await self.endpoint_health.start(self.datastore, self.director.inflight.values)
        for plugin in self._background_plugins():
            plugin.start_background(self.datastore)
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="epp-housekeeping"))
        for warning in self.built.warnings:
            log.warning("Config", problem=warning)
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
            endpoint_health={**self.endpoint_health.describe(), "source": "config" if self.endpoint_health_configured else "defaults"},
            feature_gates={k: v for k, v in self.built.feature_gates.items() if k in ("flowControl", "haPopulateNonLeaderDatastore")},
            saturation_detector=getattr(self.built.saturation_detector, "name", None),
            parsers=[p.name for p in self.built.parsers.parsers],
            leader_election=o.ha_enable_leader_election,
        )

    async def stop(self, grace: float | None = None) -> None:
        """Drain, then stop: NOT_SERVING and the lease released at once; no new streams; open ones get `grace` seconds."""
        grace = self.options.drain_timeout if grace is None else grace
        self.health.draining = True
        if self.leader_election is not None:
            await self.leader_election.release()
        log.info("Draining", drain_timeout_s=grace, open_streams=self.processor.open_streams)
        stopping = asyncio.create_task(self._grpc.stop(grace)) if self._grpc is not None else None
        if self.flow_control is not None:
            # queued requests may still be dispatched during the drain; what is left at the end gets 503
            loop = asyncio.get_running_loop()
            deadline = loop.time() + max(0.0, grace - 0.5)
            while self.flow_control.queued and loop.time() < deadline:
                await asyncio.sleep(0.05)
            await self.flow_control.stop()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.scraper is not None:
            await self.scraper.stop()
        await self.endpoint_health.stop()
        for plugin in self._background_plugins():
            plugin.stop_background()
        if stopping is not None:
            await stopping
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
        try:
            bound = server.add_secure_port(addr, creds) if creds else server.add_insecure_port(addr)
        except RuntimeError:  # grpcio raises instead of returning 0 on a failed bind
            bound = 0
        if not bound:
            raise OSError(f"cannot listen on {addr}; is the port in use? choose another with the matching --*-port flag")
        return bound

    def _credentials(self) -> grpc.ServerCredentials:
        o = self.options
        suites = grpc_cipher_suites(o.tls_min_version, o.tls_cipher_suites)
        if suites:
            # gRPC reads its cipher list once per process, from the environment, before the first TLS handshake
            os.environ["GRPC_SSL_CIPHER_SUITES"] = suites
        if o.cert_path:
            cert_dir = Path(o.cert_path)
            cert, key = cert_dir / "tls.crt", cert_dir / "tls.key"
            if not cert.is_file() or not key.is_file():
                raise FileNotFoundError(f"--cert-path {cert_dir} must contain tls.crt and tls.key")
            if o.enable_cert_reload:
                return _reloading_credentials(cert, key)
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
        if self.flow_metrics is not None:
            self.metrics.before_render(lambda: self.flow_metrics.refresh(
                self.flow_control, lambda: self.built.saturation_detector.saturation(self.datastore.endpoints())))
        self.metrics_endpoint = MetricsEndpoint(self.metrics.render, self.metrics_authorizer)
        self._metrics_runner = web.AppRunner(self.metrics_endpoint.app(), access_log=None)
        await self._metrics_runner.setup()
        site = web.TCPSite(self._metrics_runner, self.options.bind_address, port, ssl_context=self._metrics_tls())
        await site.start()
        return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def _metrics_tls(self) -> Any:
        """--metrics-cert-dir (and --metrics-client-ca-file): TLS 1.2+ on /metrics, optionally mutual."""
        o = self.options
        if not o.metrics_cert_dir:
            return None
        import ssl

        cert, key = Path(o.metrics_cert_dir) / "tls.crt", Path(o.metrics_cert_dir) / "tls.key"
        if not cert.is_file() or not key.is_file():
            raise FileNotFoundError(f"--metrics-cert-dir {o.metrics_cert_dir} must contain tls.crt and tls.key")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(cert), str(key))
        if o.metrics_client_ca_file:
            ctx.load_verify_locations(o.metrics_client_ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    async def _start_discovery(self) -> None:
        o = self.options
        file_discovery = self.built.data_layer.discovery
        sources = [n for n, v in (("--endpoints-file", o.endpoints_file), ("--pool-name", o.pool_name),
                                  ("--endpoint-selector", o.endpoint_selector), ("dataLayer.discovery", file_discovery)) if v]
        if len(sources) > 1 and not (o.pool_name and o.endpoints_file):
            raise ValueError(f"give one endpoint source, not {' and '.join(sources)}")
        if o.endpoints_file or file_discovery is not None:
            path = o.endpoints_file or file_discovery.path
            poll = 1.0 if (o.endpoints_file or file_discovery.watch) else None
            self.discovery = StaticFileDiscovery(self.datastore, path, objectives=self.objectives)
            self.discovery.load()
            if poll is not None:
                self._tasks.append(asyncio.create_task(self.discovery.run(), name="static-discovery"))
        elif o.pool_name or o.endpoint_selector:
            from epp.discovery.kubernetes import InferencePoolDiscovery, PoolSpec

            standalone = PoolSpec.standalone(o.endpoint_selector, o.endpoint_target_ports) if o.endpoint_selector else None
            self.discovery = InferencePoolDiscovery(self.datastore, o.pool_name, o.pool_namespace, kubeconfig=o.kubeconfig,
                                                    standalone=standalone, objectives=self.objectives,
                                                    objective_poll=o.objective_poll_interval)
            if self._populate_now():
                self._start_k8s_discovery()
        else:
            raise ValueError("no endpoint source: give --endpoints-file FILE (local), --pool-name NAME (Kubernetes InferencePool) "
                             "or --endpoint-selector SELECTOR with --endpoint-target-ports (Kubernetes, no InferencePool)")
        if self.scraper_wanted():
            await self._start_scraper()

    def _populate_now(self) -> bool:
        """Followers keep their datastore warm unless the haPopulateNonLeaderDatastore gate is off."""
        return not self.options.ha_enable_leader_election or self.built.feature_gates.get("haPopulateNonLeaderDatastore", True)

    def _start_k8s_discovery(self) -> None:
        if not any(t.get_name() == "kubernetes-discovery" for t in self._tasks):
            self._tasks.append(asyncio.create_task(self.discovery.run(), name="kubernetes-discovery"))

    async def _start_scraper(self) -> None:
        from epp.scrape import MetricsScraper

        if self.scraper is not None:
            return
        o = self.options
        source = self.built.data_layer.metrics_source
        if source is None:
            log.warning("Endpoint metrics are not collected (dataLayer has no sources); metric-based plugins see none")
            return
        scheme = o.model_server_metrics_scheme or source.scheme
        path = o.model_server_metrics_path or source.path
        insecure = source.insecure_skip_verify if o.model_server_metrics_insecure_skip_verify is None else o.model_server_metrics_insecure_skip_verify
        port = o.model_server_metrics_port

        def url_for(ep: Any) -> str:
            if ep.metrics_url:
                return ep.metrics_url
            host = f"{ep.hostport.rsplit(':', 1)[0]}:{port}" if port else ep.hostport
            return f"{scheme}://{host}{path}"

        self.scraper = MetricsScraper(self.datastore, interval=o.refresh_metrics_interval, staleness=o.metrics_staleness_threshold,
                                      url_for=url_for, verify_tls=not insecure,
                                      on_failure=self.endpoint_health.probe_soon)  # a failed scrape makes endpoint health check readiness now
        await self.scraper.start()

    def _background_plugins(self) -> list[Background]:
        return [p for p in self.built.plugins.values() if isinstance(p, Background)]

    def scraper_wanted(self) -> bool:
        """Scrape when something reads endpoint metrics (saves work for load-only profiles).

        That is a scheduling plugin that needs them, an explicitly configured data source, or a
        metric-based saturation detector that is in use (flow control on, or sheddable objectives).
        """
        profiles = self.scheduler.profiles.values()
        in_profiles = [p for prof in profiles for p in (*prof.filters, *(w.scorer for w in prof.scorers), prof.picker)]
        if any(getattr(p, "needs_metrics", False) for p in in_profiles) or self.built.data_layer.explicit:
            return True
        detector_reads_metrics = getattr(self.built.saturation_detector, "needs_metrics", False)
        return detector_reads_metrics and (self.flow_control is not None or self.objectives.any_sheddable())

    # -- leader election ------------------------------------------------------------------------
    def _is_leader(self) -> bool:
        return self.leader_election is not None and self.leader_election.is_leader

    def _start_leader_election(self) -> None:
        from epp.discovery.kubernetes import load_credentials
        from epp.ha.leader_election import LeaderElector, Timing, lease_name, standalone_name

        o = self.options
        if o.pool_name:
            name = o.pool_name
        elif o.endpoint_selector:
            name = standalone_name()
        else:
            raise ValueError("--ha-enable-leader-election needs Kubernetes discovery (--pool-name or --endpoint-selector) to hold a Lease")
        self.leader_election = LeaderElector(lambda: load_credentials(o.kubeconfig), o.pool_namespace, lease_name(o.pool_namespace, name),
                                             timing=Timing(*o.leader_election_timing), on_change=self._leadership_changed)
        self._tasks.append(asyncio.create_task(self.leader_election.run(), name="leader-election"))

    def _leadership_changed(self, leading: bool) -> None:
        if leading and self.discovery is not None and not self._populate_now():
            self._start_k8s_discovery()  # haPopulateNonLeaderDatastore=false: discover only once leading

    # -- housekeeping ---------------------------------------------------------------------------
    async def _housekeeping(self) -> None:
        """Log readiness changes, start the scraper when sheddable objectives appear, reap stale requests."""
        ready = False
        while True:
            now_ready = self.health.ready()
            if now_ready != ready:
                ready = now_ready
                log.info("Health", ready=ready, synced=self.datastore.synced, endpoints=len(self.datastore),
                         leader=self._is_leader() if self.leader_election is not None else None)
            if self.scraper is None and self.scraper_wanted():
                await self._start_scraper()
            self.director.reap_expired()
            budget = self.processor.budget
            if budget.churn >= TRIM_AFTER_CHURN_BYTES:
                # Large bodies came and went: gRPC's receive buffers and the bodies' pages are free but
                # still mapped. Give them back (in a thread: malloc_trim runs without the GIL).
                budget.churn = 0
                await asyncio.to_thread(memory.trim)
            await asyncio.sleep(0.1 if not ready else 0.5)


def _reloading_credentials(cert: Path, key: Path) -> grpc.ServerCredentials:
    """--enable-cert-reload: new handshakes use tls.crt/tls.key as they are on disk now."""
    state: dict[str, Any] = {}

    def current() -> grpc.ServerCertificateConfiguration | None:
        stamp = (cert.stat().st_mtime_ns, key.stat().st_mtime_ns)
        if state.get("stamp") == stamp:
            return None  # unchanged: gRPC keeps the configuration it has
        state["stamp"] = stamp
        log.info("TLS certificate loaded", cert=str(cert))
        return grpc.ssl_server_certificate_configuration([(key.read_bytes(), cert.read_bytes())])

    initial = current()
    assert initial is not None
    return grpc.dynamic_ssl_server_credentials(initial, current)


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


__all__ = ["EPPServer", "ServerOptions", "EXT_PROC_SERVICE", "default_admin_socket", "self_signed_certificate"]
