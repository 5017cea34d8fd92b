"""Reads every endpoint's /metrics on an interval, in the background: scheduling never waits for it.

Each endpoint is scraped concurrently with its own timeout. A failed scrape keeps the last good
values (their age grows, so plugins and the decision log can see they are stale) and records the
error. The transfer profile changes rarely and is kept when a later scrape lacks it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Callable

import aiohttp

from epp.datastore import Datastore, Endpoint
from epp.observability.logging import get_logger
from epp.scrape.parse import parse_metrics

log = get_logger("epp.scrape")


class MetricsScraper:
    def __init__(self, datastore: Datastore, interval: float = 0.05, timeout: float = 1.0, staleness: float = 2.0,
                 url_for: Callable[[Endpoint], str] | None = None, verify_tls: bool = True,
                 on_failure: Callable[[str], None] | None = None) -> None:
        self.datastore = datastore
        self.url_for = url_for or Endpoint.scrape_url  # the dataLayer's metrics-data-source decides scheme, path, port
        self.verify_tls = verify_tls
        self.on_failure = on_failure  # called with the endpoint key after each failed scrape
        self.interval = interval
        self.timeout = timeout
        self.staleness = staleness
        self._task: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None
        self._inflight: dict[str, asyncio.Task] = {}
        self.scrapes = 0
        self.failures = 0

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout), connector=aiohttp.TCPConnector(limit=0))
        self._task = asyncio.create_task(self._loop(), name="metrics-scraper")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for t in self._inflight.values():
            t.cancel()
        if self._session:
            await self._session.close()

    async def _loop(self) -> None:
        while True:
            for ep in self.datastore.endpoints():
                # one scrape per endpoint at a time: a slow endpoint is not piled up on
                t = self._inflight.get(ep.key)
                if t is None or t.done():
                    self._inflight[ep.key] = asyncio.create_task(self.scrape(ep))
            await asyncio.sleep(self.interval)

    async def scrape(self, ep: Endpoint) -> None:
        assert self._session is not None
        try:
            async with self._session.get(self.url_for(ep), ssl=self.verify_tls) as r:
                if r.status != 200:
                    raise aiohttp.ClientResponseError(r.request_info, (), status=r.status, message=r.reason or "")
                text = await r.text()
            m = parse_metrics(text)
            if m.transfer_profile is None and ep.metrics.transfer_profile is not None:
                m = dataclasses.replace(m, transfer_profile=ep.metrics.transfer_profile)
            if m.link_profiles is None and ep.metrics.link_profiles is not None:
                m = dataclasses.replace(m, link_profiles=ep.metrics.link_profiles)
            self.datastore.set_metrics(ep.key, m)
            self.scrapes += 1
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            self.failures += 1
            old = ep.metrics
            if old.error is None:
                log.warning("Metrics scrape failed", endpoint=ep.key, url=self.url_for(ep), error=str(e) or type(e).__name__)
            self.datastore.set_metrics(ep.key, dataclasses.replace(old, error=str(e) or type(e).__name__))
            if self.on_failure is not None:
                self.on_failure(ep.key)

    def stale(self, ep: Endpoint, now: float | None = None) -> bool:
        return ep.metrics.age(time.monotonic() if now is None else now) > self.staleness
