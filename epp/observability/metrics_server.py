"""The `/metrics` HTTP endpoint: rendered off the event loop, optionally behind Kubernetes authn/authz.

Rendering walks every series; doing it on the asyncio loop would make ext_proc streams and health
checks wait for each scrape. It runs in a worker thread (one render at a time; concurrent scrapes
share it). With an authorizer, a request needs `Authorization: Bearer <token>` that the
Kubernetes API accepts (TokenReview) for a user allowed to `get` the non-resource URL `/metrics`
(SubjectAccessReview) — what the Go EPP's `--metrics-endpoint-auth` does.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST

from epp.observability.logging import get_logger

log = get_logger("epp.metrics")


class MetricsEndpoint:
    def __init__(self, render: Callable[[], bytes], authorizer: Any = None) -> None:
        self.render_fn = render
        self.authorizer = authorizer
        self._render: asyncio.Future | None = None
        self.renders = 0

    async def render(self) -> bytes:
        """The exposition text, produced in a worker thread; scrapes arriving meanwhile share one render."""
        if self._render is None:
            self._render = asyncio.ensure_future(asyncio.to_thread(self.render_fn))
            self._render.add_done_callback(self._rendered)
        return await asyncio.shield(self._render)

    def _rendered(self, _fut: asyncio.Future) -> None:
        self._render = None
        self.renders += 1

    async def handle(self, request: web.Request) -> web.Response:
        if self.authorizer is not None:
            denied = await self.authorizer.check(request.headers.get("Authorization", ""), "/metrics")
            if denied is not None:
                status, reason = denied
                return web.Response(status=status, text=reason + "\n")
        return web.Response(body=await self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.handle)
        return app
