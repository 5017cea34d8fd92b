"""The EPP's single source of endpoints, fed by one discovery source.

Reads are lock-free snapshots (a tuple swapped on every change) because the scheduler reads
on every request while discovery writes rarely. Listeners hear about removals so stateful
plugins (active-request counts, prefix indexes) can drop per-endpoint state.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterable

from epp.datastore.endpoint import Endpoint, EndpointMetrics
from epp.datastore.links import LinkProfiles

RemovalListener = Callable[[Endpoint], None]


class Datastore:
    def __init__(self) -> None:
        self._by_key: dict[str, Endpoint] = {}
        self._snapshot: tuple[Endpoint, ...] = ()
        self._lock = threading.Lock()
        self._removal_listeners: list[RemovalListener] = []
        self._synced = threading.Event()
        self.links = LinkProfiles()  # KV-transfer profiles per (prefill, decode) link

    # -- reads (hot path) -------------------------------------------------------------------
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self._snapshot

    def get(self, key: str) -> Endpoint | None:
        return self._by_key.get(key)

    def __len__(self) -> int:
        return len(self._snapshot)

    @property
    def synced(self) -> bool:
        """True once discovery has completed its first full listing."""
        return self._synced.is_set()

    def mark_synced(self) -> None:
        self._synced.set()

    def wait_synced(self, timeout: float | None = None) -> bool:
        return self._synced.wait(timeout)

    # -- writes (discovery) -----------------------------------------------------------------
    def on_removal(self, listener: RemovalListener) -> None:
        self._removal_listeners.append(listener)

    def upsert(self, endpoint: Endpoint) -> Endpoint:
        """Add or update an endpoint; an update keeps the live metrics of the old object."""
        with self._lock:
            old = self._by_key.get(endpoint.key)
            if old is not None and _same_identity(old, endpoint):
                return old
            if old is not None:
                endpoint.metrics = old.metrics
            self._by_key[endpoint.key] = endpoint
            self._publish()
        return endpoint

    def remove(self, key: str) -> Endpoint | None:
        with self._lock:
            old = self._by_key.pop(key, None)
            if old is not None:
                self._publish()
        if old is not None:
            self._notify_removed([old])
        return old

    def replace_all(self, endpoints: Iterable[Endpoint]) -> None:
        """Make the set exactly `endpoints` (a full relist); unchanged ones keep their metrics."""
        removed: list[Endpoint] = []
        with self._lock:
            new: dict[str, Endpoint] = {}
            for ep in endpoints:
                old = self._by_key.get(ep.key)
                if old is not None and _same_identity(old, ep):
                    new[ep.key] = old
                else:
                    if old is not None:
                        ep.metrics = old.metrics
                    new[ep.key] = ep
            removed = [ep for key, ep in self._by_key.items() if key not in new]
            self._by_key = new
            self._publish()
        self._notify_removed(removed)

    def set_metrics(self, key: str, metrics: EndpointMetrics) -> None:
        ep = self._by_key.get(key)
        if ep is not None:
            ep.metrics = metrics

    def _publish(self) -> None:
        self._snapshot = tuple(sorted(self._by_key.values(), key=lambda e: e.key))

    def _notify_removed(self, removed: list[Endpoint]) -> None:
        for ep in removed:
            for listener in self._removal_listeners:
                listener(ep)


def _same_identity(a: Endpoint, b: Endpoint) -> bool:
    return (
        a.address == b.address
        and a.port == b.port
        and dict(a.labels) == dict(b.labels)
        and a.metrics_url == b.metrics_url
    )
