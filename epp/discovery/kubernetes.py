"""Endpoints from an InferencePool and its Pods, by Kubernetes list/watch (or from pods by label alone).

The pool (`inference.networking.k8s.io/v1`) gives `spec.selector.matchLabels` and
`spec.targetPorts`; every Ready, non-terminating Pod matching the selector contributes one
endpoint per target port (`<pod>-rank-<i>`, podIP:port, the pod's labels). In standalone mode
(--endpoint-selector, --endpoint-target-ports) the selector and ports come from the flags and no
InferencePool is read. InferenceObjectives of the pool (llm-d.ai/v1alpha2, or GIE's
inference.networking.x-k8s.io/v1alpha2) are polled for request priorities. Pods are listed, then
watched from the list's resourceVersion; a watch that ends is resumed, a `410 Gone` (expired
resourceVersion) triggers a relist, errors back off and retry, and a periodic resync re-reads the
pool so selector and port changes take effect. The datastore is marked synced — and the EPP's
health turns SERVING — only after the first complete listing.

Credentials: in-cluster service account, or a kubeconfig (parsed by kubernetes_asyncio, so
tokens, client certificates and exec plugins work as with kubectl).
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp

from epp.datastore import Datastore, Endpoint
from epp.datastore.objectives import Objectives
from epp.observability.logging import get_logger
from epp.util.label_selector import Requirement, matches, parse_selector

log = get_logger("epp.discovery.kubernetes")

POOL_GROUP = "inference.networking.k8s.io"
POOL_VERSION = "v1"
ACTIVE_PORTS_ANNOTATION = "inference.networking.k8s.io/active-ports"
OBJECTIVE_APIS = ("llm-d.ai/v1alpha2", "inference.networking.x-k8s.io/v1alpha2")
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class Gone(Exception):
    """The watch's resourceVersion is too old: relist."""


@dataclass
class Credentials:
    server: str
    headers: dict[str, str] = field(default_factory=dict)
    ssl_context: ssl.SSLContext | bool = True
    token_file: str | None = None  # re-read per request (projected tokens rotate)

    def auth_headers(self) -> dict[str, str]:
        h = dict(self.headers)
        if self.token_file:
            h["Authorization"] = "Bearer " + Path(self.token_file).read_text().strip()
        return h


def in_cluster_credentials() -> Credentials:
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host or not (SA_DIR / "token").exists():
        raise RuntimeError("not running in a cluster (no KUBERNETES_SERVICE_HOST or service-account token); give --kubeconfig")
    ctx = ssl.create_default_context(cafile=str(SA_DIR / "ca.crt"))
    return Credentials(f"https://{host}:{port}", ssl_context=ctx, token_file=str(SA_DIR / "token"))


async def kubeconfig_credentials(path: str | None) -> Credentials:
    from kubernetes_asyncio import client, config

    cfg = client.Configuration()
    await config.load_kube_config(config_file=path, client_configuration=cfg)
    headers = {}
    token = cfg.api_key.get("authorization") or cfg.api_key.get("BearerToken")
    if token:
        headers["Authorization"] = token if token.lower().startswith("bearer ") else f"Bearer {token}"
    ctx: ssl.SSLContext | bool = True
    if cfg.host.startswith("https"):
        ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert) if cfg.ssl_ca_cert else ssl.create_default_context()
        if cfg.cert_file and cfg.key_file:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
        if not cfg.verify_ssl:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
    return Credentials(cfg.host.rstrip("/"), headers, ctx)


async def load_credentials(kubeconfig: str | None) -> Credentials:
    """A kubeconfig when one is given (or when not in a cluster), else the pod's service account."""
    if kubeconfig or not os.environ.get("KUBERNETES_SERVICE_HOST"):
        return await kubeconfig_credentials(kubeconfig)
    return in_cluster_credentials()


@dataclass(frozen=True)
class PoolSpec:
    """Which pods are endpoints, and on which ports: from an InferencePool, or from the standalone flags."""

    selector: tuple[Requirement, ...]
    ports: tuple[int, ...]
    selector_text: str  # what the API server filters on (labelSelector)

    @classmethod
    def from_object(cls, obj: dict[str, Any]) -> "PoolSpec":
        spec = obj.get("spec") or {}
        sel = spec.get("selector") or {}
        match = sel.get("matchLabels", sel) if isinstance(sel, dict) else {}  # v1: matchLabels; v1alpha2: a plain map
        ports = tuple(int(p["number"]) for p in spec.get("targetPorts") or [] if "number" in p)
        if not ports and "targetPortNumber" in spec:
            ports = (int(spec["targetPortNumber"]),)
        if not match or not ports:
            raise ValueError("InferencePool needs spec.selector.matchLabels and spec.targetPorts")
        text = ",".join(f"{k}={v}" for k, v in sorted((str(k), str(v)) for k, v in match.items()))
        return cls(tuple(parse_selector(text)), ports, text)

    @classmethod
    def standalone(cls, selector: str, ports: list[int] | tuple[int, ...]) -> "PoolSpec":
        """--endpoint-selector (Kubernetes selector syntax) and --endpoint-target-ports (1–8 ports)."""
        ports = tuple(dict.fromkeys(int(p) for p in ports))
        if not 1 <= len(ports) <= 8:
            raise ValueError("--endpoint-target-ports needs 1 to 8 ports, e.g. --endpoint-target-ports=8000,8001")
        if any(not 0 < p < 65536 for p in ports):
            raise ValueError(f"--endpoint-target-ports: ports must be 1-65535, got {list(ports)}")
        try:
            reqs = parse_selector(selector)
        except ValueError as e:
            raise ValueError(f"--endpoint-selector: {e}") from None
        return cls(tuple(reqs), ports, selector)

    def label_selector(self) -> str:
        return self.selector_text


def pod_endpoints(pod: dict[str, Any], pool: PoolSpec, namespace: str) -> list[Endpoint]:
    """The endpoints a pod contributes: none unless Ready, not terminating, with an IP."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    if meta.get("deletionTimestamp") or not status.get("podIP"):
        return []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    labels = meta.get("labels") or {}
    if not ready or not matches(list(pool.selector), labels):
        return []
    active = (meta.get("annotations") or {}).get(ACTIVE_PORTS_ANNOTATION)
    allowed = {int(p) for p in active.split(",") if p.strip().isdigit()} if active else None
    return [
        Endpoint(name=f"{meta['name']}-rank-{i}", address=status["podIP"], port=port, labels=dict(labels), namespace=namespace)
        for i, port in enumerate(pool.ports)
        if allowed is None or port in allowed
    ]


class InferencePoolDiscovery:
    def __init__(self, datastore: Datastore, pool_name: str, namespace: str, credentials: Credentials | None = None,
                 kubeconfig: str | None = None, resync_period: float = 60.0, watch_timeout: int = 300, backoff: float = 1.0,
                 standalone: PoolSpec | None = None, objectives: Objectives | None = None, objective_poll: float = 5.0) -> None:
        self.datastore, self.pool_name, self.namespace = datastore, pool_name, namespace
        self.credentials, self.kubeconfig = credentials, kubeconfig
        self.resync_period, self.watch_timeout, self.backoff = resync_period, watch_timeout, backoff
        self.standalone = standalone  # pods by label from the flags; no InferencePool
        self.objectives, self.objective_poll = objectives, objective_poll
        self.pool: PoolSpec | None = standalone
        self._pods: dict[str, list[Endpoint]] = {}
        self.relists = 0

    @classmethod
    def from_environment(cls, datastore: Datastore, pool_name: str, pool_namespace: str, kubeconfig: str | None = None) -> "InferencePoolDiscovery":
        return cls(datastore, pool_name, pool_namespace, kubeconfig=kubeconfig)

    async def _credentials(self) -> Credentials:
        if self.credentials is None:
            self.credentials = await load_credentials(self.kubeconfig)
        return self.credentials

    # -- the loop ---------------------------------------------------------------------------------
    async def run(self) -> None:
        creds = await self._credentials()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)) as session:
            poller = None
            if self.objectives is not None and self.standalone is None:
                poller = asyncio.create_task(self._poll_objectives(session, creds), name="objective-poll")
            try:
                await self._discover(session, creds)
            finally:
                if poller is not None:
                    poller.cancel()

    async def _discover(self, session: aiohttp.ClientSession, creds: Credentials) -> None:
        while True:
            try:
                await self._sync_and_watch(session, creds)
            except asyncio.CancelledError:
                raise
            except Gone:
                log.info("Watch expired (410 Gone); relisting pods")
                continue
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError) as e:
                log.warning("Kubernetes discovery error; retrying", error=str(e) or type(e).__name__, retry_in_s=self.backoff)
                await asyncio.sleep(self.backoff)
            except Exception:  # a bug must not end discovery for the life of the process
                log.exception("Kubernetes discovery failed unexpectedly; retrying", retry_in_s=self.backoff)
                await asyncio.sleep(self.backoff)

    async def _sync_and_watch(self, session: aiohttp.ClientSession, creds: Credentials) -> None:
        pool = await self._get_pool(session, creds)
        if pool is None:
            return
        rv = await self._list(session, creds, pool)
        loop = asyncio.get_running_loop()
        resync_at = loop.time() + self.resync_period
        while loop.time() < resync_at:
            rv = await self._watch(session, creds, pool, rv, min(self.watch_timeout, max(1, int(resync_at - loop.time()))))

    async def _get(self, session: aiohttp.ClientSession, creds: Credentials, path: str, params: dict[str, str] | None = None) -> tuple[int, Any]:
        url = creds.server + path + ("?" + urlencode(params) if params else "")
        async with session.get(url, headers=creds.auth_headers(), ssl=creds.ssl_context, timeout=aiohttp.ClientTimeout(total=30)) as r:
            body = await r.read()
            return r.status, (json.loads(body) if body else None)

    async def _poll_objectives(self, session: aiohttp.ClientSession, creds: Credentials) -> None:
        """InferenceObjectives whose poolRef is this pool → priorities (both API groups; a missing CRD is fine)."""
        assert self.objectives is not None
        logged: set[str] = set()
        while True:
            for api in OBJECTIVE_APIS:
                try:
                    status, obj = await self._get(session, creds, f"/apis/{api}/namespaces/{self.namespace}/inferenceobjectives")
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
                    log.warning("InferenceObjective list failed", api=api, error=str(e) or type(e).__name__)
                    continue
                if status != 200:
                    if status != 404 and api not in logged:
                        log.warning("InferenceObjective list failed", api=api, status=status)
                        logged.add(api)
                    self.objectives.replace(api, [])
                    continue
                found = []
                for item in obj.get("items") or []:
                    spec = item.get("spec") or {}
                    ref = spec.get("poolRef") or {}
                    if ref.get("name") != self.pool_name or (ref.get("group") or POOL_GROUP) != POOL_GROUP:
                        continue
                    prio = spec.get("priority")
                    found.append((item["metadata"]["name"], int(prio) if isinstance(prio, int) else 0))
                if found and api.startswith("inference.networking.x-k8s.io") and api not in logged:
                    log.info("DEPRECATION: InferenceObjective inference.networking.x-k8s.io/v1alpha2 is deprecated; use llm-d.ai/v1alpha2")
                    logged.add(api)
                self.objectives.replace(api, found)
            await asyncio.sleep(self.objective_poll)

    async def _get_pool(self, session: aiohttp.ClientSession, creds: Credentials) -> PoolSpec | None:
        if self.standalone is not None:
            return self.standalone
        path = f"/apis/{POOL_GROUP}/{POOL_VERSION}/namespaces/{self.namespace}/inferencepools/{self.pool_name}"
        status, obj = await self._get(session, creds, path)
        if status == 404:
            if self.datastore.endpoints():
                log.warning("InferencePool not found; clearing endpoints", pool=self.pool_name, namespace=self.namespace)
            self.datastore.replace_all([])
            self._pods.clear()
            await asyncio.sleep(self.backoff)
            return None
        if status != 200:
            raise ValueError(f"GET InferencePool {self.namespace}/{self.pool_name}: HTTP {status}: {obj}")
        pool = PoolSpec.from_object(obj)
        if pool != self.pool:
            log.info("InferencePool", name=self.pool_name, selector=pool.selector_text, target_ports=list(pool.ports))
        self.pool = pool
        return pool

    async def _list(self, session: aiohttp.ClientSession, creds: Credentials, pool: PoolSpec) -> str:
        status, obj = await self._get(session, creds, f"/api/v1/namespaces/{self.namespace}/pods", {"labelSelector": pool.label_selector()})
        if status != 200:
            raise ValueError(f"list pods: HTTP {status}: {obj}")
        self.relists += 1
        self._pods = {p["metadata"]["name"]: pod_endpoints(p, pool, self.namespace) for p in obj.get("items") or []}
        self.datastore.replace_all([e for eps in self._pods.values() for e in eps])
        if not self.datastore.synced:
            log.info("Pool synced", endpoints=len(self.datastore))
        self.datastore.mark_synced()
        return obj.get("metadata", {}).get("resourceVersion", "")

    async def _watch(self, session: aiohttp.ClientSession, creds: Credentials, pool: PoolSpec, rv: str, timeout: int) -> str:
        params = {"watch": "1", "labelSelector": pool.label_selector(), "resourceVersion": rv, "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(timeout)}
        url = f"{creds.server}/api/v1/namespaces/{self.namespace}/pods?{urlencode(params)}"
        async with session.get(url, headers=creds.auth_headers(), ssl=creds.ssl_context,
                               timeout=aiohttp.ClientTimeout(total=timeout + 30, sock_read=timeout + 30)) as r:
            if r.status == 410:
                raise Gone()
            if r.status != 200:
                raise ValueError(f"watch pods: HTTP {r.status}: {(await r.read())[:200]!r}")
            async for line in r.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone()
                    raise ValueError(f"watch error: {obj.get('message', obj)}")
                rv = (obj.get("metadata") or {}).get("resourceVersion", rv)
                if kind == "BOOKMARK":
                    continue
                self._apply(kind, obj, pool)
        return rv

    def _apply(self, kind: str, pod: dict[str, Any], pool: PoolSpec) -> None:
        name = pod["metadata"]["name"]
        new = [] if kind == "DELETED" else pod_endpoints(pod, pool, self.namespace)
        old = self._pods.pop(name, [])
        if new:
            self._pods[name] = new
        new_keys = {e.key for e in new}
        for e in old:
            if e.key not in new_keys:
                self.datastore.remove(e.key)
        for e in new:
            self.datastore.upsert(e)
        if {e.key for e in old} != new_keys:
            log.info("Pool endpoints changed", pod=name, change=kind, endpoints=[f"{e.key}={e.hostport}" for e in new])
