"""Per-endpoint health on /metrics, read from the monitor at scrape time (nothing on the request path).

Series exist only for endpoints in the pool, so a removed endpoint's series go with it.
"""

from __future__ import annotations

from typing import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from epp.endpoint_health.monitor import HealthMonitor
from epp.endpoint_health.state import STATES

PREFIX = "inference_epp_endpoint_"


class HealthCollector(Collector):
    def __init__(self, monitor: HealthMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        snaps = self.monitor.snapshots()
        state = GaugeMetricFamily(PREFIX + "health_state", "1 for the endpoint's current health state (healthy, ejected, unready, half_open).",
                                  labels=("endpoint", "name", "state"))
        ready = GaugeMetricFamily(PREFIX + "ready", "1 when the endpoint's last readiness check passed, 0 when it failed.", labels=("endpoint", "name"))
        outcomes = CounterMetricFamily(PREFIX + "outcomes", "Requests the endpoint finished, by what their end says about it.",
                                       labels=("endpoint", "name", "outcome"))
        ejections = CounterMetricFamily(PREFIX + "ejections", "Outlier ejections of the endpoint, by reason.", labels=("endpoint", "name", "reason"))
        consecutive = GaugeMetricFamily(PREFIX + "consecutive_failures", "Current run of 5xx / gateway failures (Envoy's counters).",
                                        labels=("endpoint", "name", "kind"))
        ttfb = GaugeMetricFamily(PREFIX + "time_to_first_byte_seconds", "Moving average of the time to the response's first byte (successes).",
                                 labels=("endpoint", "name"))
        instances = GaugeMetricFamily(PREFIX + "instances_up", "Prefill / decode instances the endpoint reports up (P/D proxies).",
                                      labels=("endpoint", "name", "role"))
        for s in snaps:
            ids = (s["hostport"], s["endpoint"])
            for st in STATES:
                state.add_metric((*ids, st), 1.0 if s["state"] == st else 0.0)
            if s["ready"] is not None:
                ready.add_metric(ids, 1.0 if s["ready"] else 0.0)
            for kind, n in s["outcomes"].items():
                outcomes.add_metric((*ids, kind), n)
            for reason, n in s["ejections"].items():
                ejections.add_metric((*ids, reason), n)
            consecutive.add_metric((*ids, "5xx"), s["consecutive_5xx"])
            consecutive.add_metric((*ids, "gateway"), s["consecutive_gateway_failures"])
            if "ttfb_seconds" in s:
                ttfb.add_metric(ids, s["ttfb_seconds"])
            for role, v in (s.get("instances") or {}).items():
                instances.add_metric((*ids, role), v["up"])
        yield from (state, ready, outcomes, ejections, consecutive, ttfb, instances)

    def describe(self) -> Iterator[Metric]:
        return iter(())  # series appear and go with endpoints: no fixed description
