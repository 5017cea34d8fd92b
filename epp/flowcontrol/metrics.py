"""Flow-control metrics, under llm-d's names (`llm_d_epp_flow_control_*`) and GIE's (`inference_extension_flow_control_*`).

Labels are `priority` and `inference_pool` (plus `outcome` where it applies); the client-chosen
fairness ID and model names are left out so a client cannot grow the series without bound.
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIXES = ("llm_d_epp_", "inference_extension_")
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class FlowControlMetrics:
    def __init__(self, registry: CollectorRegistry, pool: str) -> None:
        self.pool = pool
        self._requests = [Counter(f"{p}flow_control_requests_total", "Requests by their flow-control outcome.",
                                  ("outcome", "priority", "inference_pool"), registry=registry) for p in PREFIXES]
        self._waited = [Histogram(f"{p}flow_control_request_queue_duration_seconds", "Time a request spent in flow control, enqueue to outcome.",
                                  ("priority", "outcome", "inference_pool"), buckets=_QUEUE_BUCKETS, registry=registry) for p in PREFIXES]
        self._size = [Gauge(f"{p}flow_control_queue_size", "Requests waiting in flow control.", ("priority", "inference_pool"), registry=registry)
                      for p in PREFIXES]
        self._bytes = [Gauge(f"{p}flow_control_queue_bytes", "Bytes of the requests waiting in flow control.", ("priority", "inference_pool"),
                             registry=registry) for p in PREFIXES]
        self._saturation = [Gauge(f"{p}flow_control_pool_saturation", "The saturation detector's reading over the pool (1.0 gates dispatch).",
                                  ("inference_pool", "stage"), registry=registry) for p in PREFIXES]
        self._seen_priorities: set[str] = set()

    def outcome(self, priority: int, outcome: str, waited: float) -> None:
        prio = str(priority)
        for c in self._requests:
            c.labels(outcome, prio, self.pool).inc()
        for h in self._waited:
            h.labels(prio, outcome, self.pool).observe(waited)

    def refresh(self, controller: Any, saturation: Callable[[], float]) -> None:
        """Queue gauges and the pool saturation, read at exposition time."""
        bands = {str(p): b for p, b in controller.bands.items()}
        self._seen_priorities.update(bands)
        for prio in self._seen_priorities:
            band = bands.get(prio)
            for g in self._size:
                g.labels(prio, self.pool).set(band.count if band else 0)
            for g in self._bytes:
                g.labels(prio, self.pool).set(band.bytes if band else 0)
        value = saturation()
        for g in self._saturation:
            g.labels(self.pool, "effective").set(value)
