"""Leader election on a Kubernetes Lease (coordination.k8s.io/v1), with client-go's semantics.

Replicas started with --ha-enable-leader-election compete for the Lease
`epp-<namespace>-<name>.llm-d.ai` (the Go EPP's name): the holder renews `spec.renewTime` every
retry period; another replica takes the lease over only when it has seen no change to the lease
record for `leaseDurationSeconds` by its own clock (the renewal's timestamp only corrects for how
late the change was seen, within a bound that keeps clock skew harmless), and every write carries the `resourceVersion` it read, so two candidates can never both
win (the API server answers 409 to the slower one). A leader that cannot renew for the renew
deadline stops being leader; leadership is checked against the time of the last successful renew
on every read of `is_leader`, so a paused or partitioned leader is not ready a moment longer than
that. On shutdown the leader releases the lease (empty holder), as controller-runtime's
LeaderElectionReleaseOnCancel does, and a follower takes over within one retry period.

Only the leader is ready (readiness health); followers keep discovering endpoints so they can
serve the moment they lead.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import random
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import aiohttp

from epp.discovery.kubernetes import Credentials
from epp.observability.logging import get_logger

log = get_logger("epp.ha")

LEASE_API = "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"
JITTER = 1.2  # client-go's JitterFactor for the retry period


def lease_name(namespace: str, name: str) -> str:
    """The Go EPP's lease name: unique per EPP deployment (pool or standalone deployment)."""
    return f"epp-{namespace}-{name}.llm-d.ai"


def default_identity() -> str:
    return f"{socket.gethostname()}_{uuid.uuid4()}"


def _now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Timing:
    lease_duration: float = 15.0  # controller-runtime defaults
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def check(self) -> None:
        if not self.lease_duration > self.renew_deadline:
            raise ValueError("leader election: the lease duration must be greater than the renew deadline")
        if not self.renew_deadline > JITTER * self.retry_period:
            raise ValueError(f"leader election: the renew deadline must be greater than {JITTER} × the retry period")
        if self.retry_period <= 0:
            raise ValueError("leader election: the retry period must be positive")


class LeaderElector:
    def __init__(self, credentials_fn: Callable[[], Any], namespace: str, name: str, identity: str | None = None,
                 timing: Timing = Timing(), on_change: Callable[[bool], None] | None = None) -> None:
        timing.check()
        self.credentials_fn = credentials_fn
        self.namespace, self.name = namespace, name
        self.identity = identity or default_identity()
        self.timing = timing
        self.on_change = on_change
        self._renewed_at = float("-inf")  # monotonic time of our last successful acquire/renew
        self._observed: dict[str, Any] | None = None  # the last lease spec seen
        self._observed_at = 0.0  # monotonic time it was first seen (client-go's observedTime)
        self._leading = False
        self._session: aiohttp.ClientSession | None = None
        self._creds: Credentials | None = None
        self.transitions_seen = 0

    # -- state ----------------------------------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        """Leader now: we hold the lease and renewed it within the renew deadline."""
        return self._leading and time.monotonic() - self._renewed_at < self.timing.renew_deadline

    @property
    def holder(self) -> str:
        return (self._observed or {}).get("holderIdentity") or ""

    def _set_leading(self, leading: bool) -> None:
        if leading != self._leading:
            self._leading = leading
            log.info("Leader election", leader=leading, identity=self.identity, lease=f"{self.namespace}/{self.name}")
            if self.on_change is not None:
                self.on_change(leading)

    # -- the API --------------------------------------------------------------------------------
    def _url(self, with_name: bool = True) -> str:
        assert self._creds is not None
        base = self._creds.server + LEASE_API.format(ns=self.namespace)
        return f"{base}/{self.name}" if with_name else base

    async def _request(self, method: str, url: str, body: dict | None = None) -> tuple[int, Any]:
        assert self._session is not None and self._creds is not None
        async with self._session.request(method, url, json=body, headers=self._creds.auth_headers(), ssl=self._creds.ssl_context,
                                         timeout=aiohttp.ClientTimeout(total=max(1.0, self.timing.retry_period))) as r:
            data = await r.read()
            try:
                return r.status, json.loads(data) if data else None
            except ValueError:
                return r.status, None

    def _record(self, old: dict[str, Any] | None) -> dict[str, Any]:
        now = _now_rfc3339()
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, int(round(self.timing.lease_duration))),
            "acquireTime": now,
            "renewTime": now,
            "leaseTransitions": 0,
        }
        if old:
            if old.get("holderIdentity") == self.identity:
                spec["acquireTime"] = old.get("acquireTime") or now
                spec["leaseTransitions"] = old.get("leaseTransitions") or 0
            else:
                spec["leaseTransitions"] = (old.get("leaseTransitions") or 0) + 1
        return spec

    async def try_acquire_or_renew(self) -> bool:
        """One client-go tryAcquireOrRenew: True when we hold the lease afterwards."""
        status, obj = await self._request("GET", self._url())
        now = time.monotonic()
        if status == 404:
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace}, "spec": self._record(None)}
            status, obj = await self._request("POST", self._url(with_name=False), body)
            if status in (200, 201):
                self._observe(obj.get("spec") or {}, now)
                return True
            return False
        if status != 200 or not isinstance(obj, dict):
            raise ConnectionError(f"GET lease {self.namespace}/{self.name}: HTTP {status}")
        spec = obj.get("spec") or {}
        self._observe(spec, now)
        holder = spec.get("holderIdentity") or ""
        duration = float(spec.get("leaseDurationSeconds") or self.timing.lease_duration)
        if holder and holder != self.identity and now < self._observed_at + duration:
            return False  # someone else holds a lease that has not expired (by our observation)
        if holder != self.identity and self._leading:
            return False  # we lost it to someone else
        body = dict(obj)
        body["spec"] = self._record(spec)
        status, updated = await self._request("PUT", self._url(), body)
        if status == 200 and isinstance(updated, dict):
            self._observe(updated.get("spec") or {}, time.monotonic())
            return True
        return False  # 409: someone wrote first (optimistic concurrency on resourceVersion)

    def _observe(self, spec: dict[str, Any], now: float) -> None:
        key = {k: spec.get(k) for k in ("holderIdentity", "renewTime", "leaseDurationSeconds", "leaseTransitions")}
        if key != self._observed:
            self._observed, self._observed_at = key, now - self._observation_lag(spec.get("renewTime"))

    def _observation_lag(self, renew_time: Any) -> float:
        """How long ago the renewal we just saw happened, by its timestamp, trusted only within bounds.

        client-go counts a lease's age from when a follower first sees the change, which lags the
        renewal by up to one poll; the timestamp removes that lag. It may move the takeover earlier
        by at most min(retry period, lease duration − renew deadline), so a skewed clock can never
        make a follower ready before the old leader's renew deadline has passed.
        """
        if not isinstance(renew_time, str):
            return 0.0
        try:
            renewed = datetime.datetime.fromisoformat(renew_time.replace("Z", "+00:00"))
        except ValueError:
            return 0.0
        lag = (datetime.datetime.now(datetime.timezone.utc) - renewed).total_seconds()
        t = self.timing
        return min(max(0.0, lag), t.retry_period, t.lease_duration - t.renew_deadline)

    def _time_to_expiry(self) -> float:
        duration = float((self._observed or {}).get("leaseDurationSeconds") or self.timing.lease_duration)
        return self._observed_at + duration - time.monotonic()

    # -- the loop -------------------------------------------------------------------------------
    async def run(self) -> None:
        self._creds = await self.credentials_fn()
        self._session = aiohttp.ClientSession()
        try:
            while True:
                await self._acquire()
                await self._renew_until_lost()
        finally:
            self._set_leading(False)
            await self._session.close()

    async def _attempt(self) -> bool:
        try:
            return await self.try_acquire_or_renew()
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError, ValueError) as e:
            log.warning("Leader election: lease request failed", error=str(e) or type(e).__name__)
            return False

    async def _acquire(self) -> None:
        t = self.timing
        while True:
            if await self._attempt():
                self._renewed_at = time.monotonic()
                self._set_leading(True)
                return
            # Retry at the jittered period, or the moment the observed lease expires if that is sooner.
            wait = t.retry_period * random.uniform(1.0, JITTER)
            if self.holder and self.holder != self.identity:
                wait = min(wait, max(0.01, self._time_to_expiry() + 0.01))
            await asyncio.sleep(wait)

    async def _renew_until_lost(self) -> None:
        t = self.timing
        while True:
            await asyncio.sleep(t.retry_period)
            if await self._attempt():
                self._renewed_at = time.monotonic()
                continue
            if self.holder and self.holder != self.identity:
                log.warning("Leader election: another replica holds the lease", holder=self.holder)
                self._set_leading(False)
                return
            if time.monotonic() - self._renewed_at >= t.renew_deadline:
                log.warning("Leader election: could not renew the lease within the renew deadline", renew_deadline_s=t.renew_deadline)
                self._set_leading(False)
                return

    async def release(self) -> None:
        """Give the lease up (empty holder, 1s duration) so a follower takes over at once."""
        if not self._leading or self._session is None or self._session.closed:
            return
        self._set_leading(False)
        try:
            status, obj = await self._request("GET", self._url())
            if status != 200 or (obj.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            now = _now_rfc3339()
            obj["spec"] = dict(obj["spec"], holderIdentity="", leaseDurationSeconds=1, renewTime=now, acquireTime=now)
            status, _ = await self._request("PUT", self._url(), obj)
            log.info("Leader election: lease released", ok=status == 200)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            log.warning("Leader election: could not release the lease", error=str(e) or type(e).__name__)


def standalone_name(pod_name: str | None = None) -> str:
    """The Go EPP's name for a standalone EPP (no InferencePool): its Deployment, from POD_NAME."""
    import re

    pod = pod_name if pod_name is not None else os.environ.get("POD_NAME", "")
    if not pod:
        raise ValueError("standalone mode (--endpoint-selector) needs the POD_NAME environment variable (Downward API) to name this EPP")
    m = re.match(r"^(.+)-[a-z0-9]+-[a-z0-9]+$", pod)
    if not m:
        raise ValueError(f"cannot derive the Deployment name from POD_NAME {pod!r} (expected NAME-<replicaset hash>-<pod id>)")
    return m.group(1)
