"""A local HTTP server speaking the Kubernetes list/watch wire format for one namespace.

Pods and an InferencePool live in memory; every change bumps the resourceVersion and is pushed to
open watches as a JSON-lines event, as the API server does. Tests can also break the watch,
answer 410 Gone, and require a bearer token.
"""

from __future__ import annotations

import asyncio
import copy
import json

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

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/apis/inference.networking.k8s.io/v1/namespaces/{ns}/inferencepools/{name}", self.get_pool)
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self.pods_handler)
        app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", self.token_review)
        app.router.add_post("/apis/authorization.k8s.io/v1/subjectaccessreviews", self.access_review)
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

    def _authorized(self, request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {TOKEN}"

    async def get_pool(self, request):
        if not self._authorized(request):
            return web.json_response({"kind": "Status", "code": 401}, status=401)
        if self.pool is None or request.match_info["name"] != "pool":
            return web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)
        return web.json_response(self.pool)

    def _match(self, p: dict, selector: str) -> bool:
        want = dict(kv.split("=", 1) for kv in selector.split(",") if kv)
        return all(p["metadata"]["labels"].get(k) == v for k, v in want.items())

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
