"""`--metrics-endpoint-auth`: who may read `/metrics`, decided by the Kubernetes API as the Go EPP does.

A scrape must carry `Authorization: Bearer <token>`. The token is checked with a TokenReview
(authentication.k8s.io/v1); the user it names must be allowed `get` on the non-resource URL
(SubjectAccessReview, authorization.k8s.io/v1) — controller-runtime's
`WithAuthenticationAndAuthorization`. Answers are cached briefly per token (by hash, bounded), so
a Prometheus scraping every few seconds costs two API calls a minute.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from typing import Any

import aiohttp

from epp.observability.logging import get_logger

log = get_logger("epp.metrics.auth")

ALLOW_TTL = 60.0
DENY_TTL = 10.0
CACHE_SIZE = 1024


class KubernetesAuthorizer:
    def __init__(self, credentials: Any) -> None:
        self.credentials = credentials  # epp.discovery.kubernetes.Credentials
        self._cache: OrderedDict[tuple[str, str], tuple[float, tuple[int, str] | None]] = OrderedDict()
        self._session: aiohttp.ClientSession | None = None
        self.reviews = 0

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def check(self, authorization: str, path: str) -> tuple[int, str] | None:
        """None when allowed, else (HTTP status, reason)."""
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return 401, "Unauthorized: send a Kubernetes bearer token (Authorization: Bearer <token>)"
        key = (hashlib.sha256(token.encode()).hexdigest(), path)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            verdict = await self._review(token, path)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            log.warning("Metrics authorization unavailable", error=str(e) or type(e).__name__)
            return 503, "authorization unavailable: the Kubernetes API could not review the token"
        self._cache[key] = (now + (ALLOW_TTL if verdict is None else DENY_TTL), verdict)
        self._cache.move_to_end(key)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return verdict

    async def _review(self, token: str, path: str) -> tuple[int, str] | None:
        self.reviews += 1
        review = await self._post("/apis/authentication.k8s.io/v1/tokenreviews",
                                  {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}})
        status = review.get("status") or {}
        if not status.get("authenticated"):
            return 401, "Unauthorized: the token was not accepted by the Kubernetes API"
        user = status.get("user") or {}
        spec = {"user": user.get("username", ""), "groups": user.get("groups") or [],
                "nonResourceAttributes": {"path": path, "verb": "get"}}
        if user.get("uid"):
            spec["uid"] = user["uid"]
        if user.get("extra"):
            spec["extra"] = user["extra"]
        sar = await self._post("/apis/authorization.k8s.io/v1/subjectaccessreviews",
                               {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec})
        if not (sar.get("status") or {}).get("allowed"):
            return 403, f"Forbidden: user {spec['user']!r} may not get {path}"
        return None

    async def _post(self, path: str, body: dict) -> dict:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        creds = self.credentials
        async with self._session.post(creds.server + path, json=body, headers=creds.auth_headers(), ssl=creds.ssl_context) as r:
            if r.status != 201 and r.status != 200:
                raise ValueError(f"POST {path}: HTTP {r.status}")
            return await r.json()
