"""A local HTTP server speaking the Kubernetes list/watch wire format for one namespace.

Pods and an InferencePool live in memory; every change bumps the resourceVersion and is pushed to
open watches as a JSON-lines event, as the API server does. Tests can also break the watch,
answer 410 Gone, and require a bearer token. Label selectors take the full string syntax
(`a=b,c!=d,e in (x,y),f notin (z),g,!h`). Leases (coordination.k8s.io/v1) support get, create and
update with optimistic concurrency: an update whose metadata.resourceVersion is not the current
one is answered 409 Conflict, as the real API server does. InferenceObjectives can be listed in
both API groups.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re

from aiohttp import web

TOKEN = "test-token"


def pod(name, ip, labels, ready=True, terminating=False, annotations=None):
    meta = {"name": name, "namespace": "llm", "labels": labels, "annotations": annotations or {}}
    if terminating:
        meta["deletionTimestamp"] = "2026-11-22T00:00:00Z"
    return {"kind": "Pod", "apiVersion": "v1", "metadata": meta,
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


class FakeAPIServer:
    def __init__(self) -> None:
        self.rv = 100
        self.pods: dict[str, dict] = {}
        self.pool: dict | None = None
        self.watchers: list[asyncio.Queue] = []
        self.history: list[tuple[int, dict]] = []
        self.expired_before = 0  # watches from an older resourceVersion get 410
        self.watch_requests = 0
        self.list_requests = 0
        self.token_users: dict[str, dict] = {}  # bearer token -> TokenReview status.user
        self.metrics_readers: set[str] = set()  # users allowed `get` on /metrics
        self.reviews: list[str] = []
        self.leases: dict[str, dict] = {}
        self.lease_writes: list[tuple[str, str, int]] = []  # (lease, holder, HTTP status) of every create/update
        self.objectives: dict[str, list[dict]] = {}  # API "group/version" -> InferenceObjective objects

    def set_pool(self, match_labels, ports):
        self.pool = {"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool", "metadata": {"name": "pool", "namespace": "llm"},
                     "spec": {"selector": {"matchLabels": match_labels}, "targetPorts": [{"number": p} for p in ports],
                              "endpointPickerRef": {"name": "epp", "port": {"number": 9002}}}}

    def _emit(self, kind: str, obj: dict) -> None:
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.rv)
        event = {"type": kind, "object": obj}
        self.history.append((self.rv, event))
        for q in self.watchers:
            q.put_nowait(event)

    def put(self, p: dict) -> None:
        kind = "MODIFIED" if p["metadata"]["name"] in self.pods else "ADDED"
        self.pods[p["metadata"]["name"]] = p
        self._emit(kind, p)

    def delete(self, name: str) -> None:
        self._emit("DELETED", self.pods.pop(name))

    def break_watches(self) -> None:
        for q in self.watchers:
            q.put_nowait(None)

    def expire(self) -> None:
        """Compact history: open watches get an ERROR 410 event and resuming from old versions fails."""
        self.expired_before = self.rv + 1
        for q in self.watchers:
            q.put_nowait({"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old resource version"}})

    def add_objective(self, name: str, priority: int | None, pool: str = "pool", api: str = "llm-d.ai/v1alpha2") -> None:
        spec = {"poolRef": {"name": pool}}
        if priority is not None:
            spec["priority"] = priority
        self.objectives.setdefault(api, []).append({"apiVersion": api, "kind": "InferenceObjective",
                                                    "metadata": {"name": name, "namespace": "llm"}, "spec": spec})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/apis/inference.networking.k8s.io/v1/namespaces/{ns}/inferencepools/{name}", self.get_pool)
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self.pods_handler)
        app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", self.token_review)
        app.router.add_post("/apis/authorization.k8s.io/v1/subjectaccessreviews", self.access_review)
        app.router.add_get("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}", self.get_lease)
        app.router.add_post("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases", self.create_lease)
        app.router.add_put("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}", self.update_lease)
        app.router.add_get("/apis/{group}/{version}/namespaces/{ns}/inferenceobjectives", self.list_objectives)
        return app

    async def token_review(self, request):
        if not self._authorized(request):
            return web.json_response({"kind": "Status", "code": 401}, status=401)
        review = await request.json()
        self.reviews.append("TokenReview")
        user = self.token_users.get(review["spec"]["token"])
        review["status"] = {"authenticated": True, "user": user} if user else {"authenticated": False, "error": "invalid bearer token"}
        return web.json_response(review, status=201)

    async def access_review(self, request):
        if not self._authorized(request):
            return web.json_response({"kind": "Status", "code": 401}, status=401)
        review = await request.json()
        self.reviews.append("SubjectAccessReview")
        spec = review["spec"]
        attrs = spec.get("nonResourceAttributes") or {}
        allowed = spec.get("user") in self.metrics_readers and attrs == {"path": "/metrics", "verb": "get"}
        review["status"] = {"allowed": allowed}
        return web.json_response(review, status=201)

    # -- leases ---------------------------------------------------------------------------------------
    async def get_lease(self, request):
        if not self._authorized(request):
            return web.json_response({"kind": "Status", "code": 401}, status=401)
        lease = self.leases.get(request.match_info["name"])
        if lease is None:
            return web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)
        return web.json_response(lease)

    async def create_lease(self, request):
        if not self._authorized(request):
            return web.json_response({"kind": "Status", "code": 401}, status=401)
        body = await request.json()
        name = body["metadata"]["name"]
        holder = (body.get("spec") or {}).get("holderIdentity", "")
        if name in self.leases:
            self.lease_writes.append((name, holder, 409))
            return web.json_response({"kind": "Status", "code": 409, "reason": "AlreadyExists"}, status=409)
        self.rv += 1
        body["metadata"]["resourceVersion"] = str(self.rv)
        self.leases[name] = body
        self.lease_writes.append((name, holder, 201))
        return web.json_response(body, status=201)

    async def update_lease(self, request):
        if not self._authorized(request):
            return web.json_response({"kind": "Status", "code": 401}, status=401)
        name = request.match_info["name"]
        body = await request.json()
        holder = (body.get("spec") or {}).get("holderIdentity", "")
        current = self.leases.get(name)
        if current is None:
            return web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)
        if (body.get("metadata") or {}).get("resourceVersion") != current["metadata"]["resourceVersion"]:
            self.lease_writes.append((name, holder, 409))
            return web.json_response({"kind": "Status", "code": 409, "reason": "Conflict",
                                      "message": "the object has been modified; please apply your changes to the latest version"}, status=409)
        self.rv += 1
        body["metadata"]["resourceVersion"] = str(self.rv)
        self.leases[name] = body
        self.lease_writes.append((name, holder, 200))
        return web.json_response(body)

    async def list_objectives(self, request):
        if not self._authorized(request):
            return web.json_response({"kind": "Status", "code": 401}, status=401)
        api = f"{request.match_info['group']}/{request.match_info['version']}"
        if api not in self.objectives:
            return web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)
        return web.json_response({"kind": "InferenceObjectiveList", "apiVersion": api, "metadata": {"resourceVersion": str(self.rv)},
                                  "items": copy.deepcopy(self.objectives[api])})

    def _authorized(self, request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {TOKEN}"

    async def get_pool(self, request):
        if not self._authorized(request):
            return web.json_response({"kind": "Status", "code": 401}, status=401)
        if self.pool is None or request.match_info["name"] != "pool":
            return web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)
        return web.json_response(self.pool)

    def _match(self, p: dict, selector: str) -> bool:
        labels = p["metadata"]["labels"]
        for term in re.split(r",(?![^(]*\))", selector):
            term = term.strip()
            if not term:
                continue
            if m := re.fullmatch(r"(\S+)\s+(in|notin)\s+\((.*)\)", term):
                values = {v.strip() for v in m.group(3).split(",")}
                if (labels.get(m.group(1)) in values) != (m.group(2) == "in"):
                    return False
            elif "!=" in term:
                k, v = term.split("!=", 1)
                if labels.get(k.strip()) == v.strip():
                    return False
            elif "=" in term:
                k, v = term.replace("==", "=").split("=", 1)
                if labels.get(k.strip()) != v.strip():
                    return False
            elif term.startswith("!"):
                if term[1:].strip() in labels:
                    return False
            elif term not in labels:
                return False
        return True

    async def pods_handler(self, request):
        if not self._authorized(request):
            return web.json_response({"kind": "Status", "code": 401}, status=401)
        selector = request.query.get("labelSelector", "")
        if request.query.get("watch") not in ("1", "true"):
            self.list_requests += 1
            items = [copy.deepcopy(p) for p in self.pods.values() if self._match(p, selector)]
            return web.json_response({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": str(self.rv)}, "items": items})
        self.watch_requests += 1
        since = int(request.query.get("resourceVersion") or 0)
        if since < self.expired_before:
            return web.json_response({"kind": "Status", "code": 410, "reason": "Expired"}, status=410)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        q: asyncio.Queue = asyncio.Queue()
        for rv, event in self.history:
            if rv > since:
                q.put_nowait(event)
        self.watchers.append(q)
        try:
            while True:
                event = await q.get()
                if event is None:
                    break
                obj = event["object"]
                if event["type"] != "ERROR" and not self._match(obj, selector):
                    continue
                await resp.write(json.dumps(event).encode() + b"\n")
                if event["type"] == "ERROR":
                    break
        finally:
            self.watchers.remove(q)
        return resp


class ThreadedAPIServer:
    """The fake API server on its own event loop in a thread, for tests that block (real EPP processes, sync gRPC).

    `call(fn, *args)` runs a mutation (put, delete, set_pool, ...) on the server's loop and waits for it.
    """

    def __init__(self, kubeconfig_dir) -> None:
        import threading
        from pathlib import Path

        from tests.conftest import free_port

        self.server = FakeAPIServer()
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="fake-apiserver")
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("fake API server did not start")
        self.kubeconfig = str(Path(kubeconfig_dir) / "kubeconfig")
        Path(self.kubeconfig).write_text(kubeconfig_text(self.port))

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        runner = web.AppRunner(self.server.app())
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())
        self._loop.close()

    def call(self, fn, *args):
        import concurrent.futures

        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run():
            try:
                fut.set_result(fn(*args))
            except Exception as e:  # surfaced in the test thread
                fut.set_exception(e)

        self._loop.call_soon_threadsafe(run)
        return fut.result(10)

    def stop(self) -> None:
        self.call(self.server.break_watches)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def kubeconfig_text(port: int) -> str:
    return f"""apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {{server: "http://127.0.0.1:{port}"}}
users:
- name: tester
  user: {{token: {TOKEN}}}
contexts:
- name: local
  context: {{cluster: local, user: tester, namespace: llm}}
current-context: local
"""
