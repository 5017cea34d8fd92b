"""Active readiness checks: GET each endpoint's /health on an interval, and at once when something looks wrong.

What counts as ready: a 200 (or a 404: the endpoint has no such route but answers). A P/D proxy's
/health also says which of its prefill and decode instances are up; a role with none up is
unready even if the status is 200. Accepted shapes of that body (the proxy's own, and a list):

    {"healthy": true, "prefill": {"http://p:8000": true}, "decode": {"http://d:8000": false}}
    {"instances": [{"role": "decode", "url": "http://d:8000", "up": false}, …]}

A refused connection or a 5xx answer is definitive (the endpoint said so); a timeout or another
error must repeat `unhealthyThreshold` times.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import aiohttp

from epp.datastore import Endpoint
from epp.endpoint_health.policy import ReadinessPolicy

ROLES = ("prefill", "decode")
MAX_BODY = 64 * 1024
MIN_SPACING = 0.1  # seconds between two probes of one endpoint asked for out of turn (failures come in bursts)


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    detail: str
    definitive: bool = False
    instances: dict[str, tuple[int, int]] = field(default_factory=dict)


def _up(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value > 0
    if isinstance(value, dict):
        for k in ("up", "healthy", "ready"):
            if isinstance(value.get(k), bool):
                return value[k]
    return None


def parse_instances(body: bytes) -> dict[str, tuple[int, int]]:
    """role -> (instances up, instances known) from a /health JSON body; {} when it says nothing about instances."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict):
        return {}
    found: dict[str, list[bool]] = {}
    listed = data.get("instances")
    if isinstance(listed, list):  # the detailed list wins over the per-role maps that may sit beside it
        for item in listed:
            if isinstance(item, dict) and item.get("role") in ROLES and _up(item) is not None:
                found.setdefault(item["role"], []).append(bool(_up(item)))
    if not found:
        for role in ROLES:
            section = data.get(role)
            values = section.values() if isinstance(section, dict) else section if isinstance(section, list) else ()
            for v in values:
                up = _up(v)
                if up is not None:
                    found.setdefault(role, []).append(up)
    return {role: (sum(ups), len(ups)) for role, ups in found.items()}


def _message(body: bytes) -> str:
    try:
        data = json.loads(body)
        if isinstance(data, dict):
            err = data.get("error")
            if isinstance(err, dict) and isinstance(err.get("message"), str):
                return err["message"][:160]
            for k in ("message", "detail", "status"):
                if isinstance(data.get(k), str):
                    return data[k][:160]
    except (ValueError, UnicodeDecodeError):
        pass
    return body[:160].decode("utf-8", "replace").strip()


def judge(path: str, status: int, body: bytes) -> Verdict:
    instances = parse_instances(body)
    if status == 404:
        return Verdict(True, f"{path} not served (404); reachable", instances=instances)
    down = [f"{role} 0/{total}" for role, (up, total) in instances.items() if total and not up]
    if status != 200:
        msg = f"no healthy instance: {', '.join(down)} up" if down else _message(body)
        return Verdict(False, f"{path} answered {status}" + (f": {msg}" if msg else ""), True, instances)
    if down:
        return Verdict(False, f"no healthy instance: {', '.join(down)} up", True, instances)
    return Verdict(True, f"{path} 200", instances=instances)


class ReadinessProber:
    """Probes every endpoint each `interval` (one probe per endpoint at a time) and on request."""

    def __init__(self, policy: ReadinessPolicy, report: Callable[[Endpoint, Verdict], None],
                 endpoints: Callable[[], Iterable[Endpoint]]) -> None:
        self.policy = policy
        self.report = report
        self.endpoints = endpoints
        self.probes = 0
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None
        self._running: dict[str, asyncio.Task] = {}
        self._due: dict[str, float] = {}
        self._started: dict[str, float] = {}
        self._asap: set[str] = set()
        self._wake: asyncio.Event | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="readiness-prober")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._running.values()) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        if self._session is not None:
            await self._session.close()

    def probe_soon(self, key: str) -> None:
        """Check this endpoint now (after the probe already running, if one is)."""
        self._asap.add(key)
        if self._wake is not None:
            self._wake.set()

    async def probe(self, ep: Endpoint) -> Verdict:
        assert self._session is not None
        p = self.policy
        try:
            async with self._session.get(f"http://{ep.hostport}{p.path}", timeout=aiohttp.ClientTimeout(total=p.timeout),
                                         allow_redirects=False) as r:
                return judge(p.path, r.status, await r.content.read(MAX_BODY))
        except aiohttp.ClientConnectorError as e:
            return Verdict(False, f"cannot connect: {e.os_error or e}", True)
        except asyncio.TimeoutError:
            return Verdict(False, f"no answer from {p.path} within {p.timeout:g}s")
        except aiohttp.ClientError as e:
            return Verdict(False, f"{p.path}: {type(e).__name__}: {e}")

    async def _run(self, ep: Endpoint) -> None:
        try:
            verdict = await self.probe(ep)
            self.probes += 1
            self.report(ep, verdict)
        finally:
            if self._wake is not None:
                self._wake.set()  # a probe asked for while this one ran may be due now

    async def _loop(self) -> None:
        assert self._wake is not None
        interval = self.policy.interval
        while True:
            now = time.monotonic()
            next_due = now + interval
            seen: set[str] = set()
            for ep in self.endpoints():
                key = ep.key
                seen.add(key)
                running = self._running.get(key)
                if running is not None and not running.done():
                    continue
                due = self._due.get(key, 0.0)
                if key in self._asap:  # asked for: now, but not more often than every MIN_SPACING
                    due = min(due, self._started.get(key, float("-inf")) + MIN_SPACING)
                if now >= due:
                    self._asap.discard(key)
                    self._started[key] = now
                    self._due[key] = due = now + interval
                    self._running[key] = asyncio.create_task(self._run(ep), name=f"readiness-{key}")
                next_due = min(next_due, due)
            for key in [k for k, t in self._running.items() if t.done()]:
                del self._running[key]
            if len(self._due) > len(seen):  # endpoints that left the pool
                for key in set(self._due) - seen:
                    self._due.pop(key, None)
                    self._started.pop(key, None)
                    self._asap.discard(key)
            self._wake.clear()
            try:  # asyncio.timeout, not wait_for: a wake-up at the moment of a cancel must not swallow it
                async with asyncio.timeout(max(0.0, next_due - time.monotonic())):
                    await self._wake.wait()
            except TimeoutError:
                pass
