"""utilization-filter (llm-d, alpha): drops endpoints over any configured cap.

Each condition caps one metric — `active-requests` (in flight through this EPP, from the
inflight-load producer), `running-requests`, `waiting-queue` or `kv-cache-utilization` (from the
endpoint's scraped metrics; missing counts as 0). An endpoint is kept only if it is within every
cap; with `fallbackOnEmpty` the unfiltered list is returned when every endpoint would go.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from epp.datalayer.inflight_load import inflight_load_producer
from epp.datastore.endpoint import Endpoint
from epp.scheduling.framework import ConfigError, CycleState, LLMRequest
from epp.scheduling.registry import PluginContext, register

METRICS = ("active-requests", "running-requests", "waiting-queue", "kv-cache-utilization")


class UtilizationFilter:
    type_name = "utilization-filter"

    def __init__(self, name: str, conditions: list[tuple[str, float]], fallback: bool, producer: Any) -> None:
        self.name, self.conditions, self.fallback, self.producer = name, conditions, fallback, producer
        self.needs_metrics = any(m != "active-requests" for m, _ in conditions)

    def _value(self, metric: str, e: Endpoint) -> float:
        if metric == "active-requests":
            return float(self.producer.load(e.key)[0])
        m = e.metrics
        v = {"running-requests": m.running, "waiting-queue": m.waiting, "kv-cache-utilization": m.kv_cache_usage}[metric]
        return float(v or 0.0)

    def filter(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        kept = [e for e in endpoints if all(self._value(m, e) <= cap for m, cap in self.conditions)]
        if not kept and self.fallback:
            return list(endpoints)
        return kept


@register("utilization-filter", experimental=True)
def _factory(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> UtilizationFilter:
    raw = parameters.get("conditions")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"plugin {name!r}: conditions must be a non-empty list of {{metric, maxValue}}")
    conditions: list[tuple[str, float]] = []
    for i, c in enumerate(raw):
        if not isinstance(c, Mapping) or set(c) - {"metric", "maxValue"}:
            raise ConfigError(f"plugin {name!r}: conditions[{i}] must be a map with metric and maxValue")
        metric, cap = c.get("metric"), c.get("maxValue")
        if metric not in METRICS:
            raise ConfigError(f"plugin {name!r}: conditions[{i}].metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if not isinstance(cap, (int, float)) or isinstance(cap, bool) or cap < 0 or (metric == "kv-cache-utilization" and cap > 1):
            raise ConfigError(f"plugin {name!r}: conditions[{i}].maxValue must be a number >= 0 (<= 1 for kv-cache-utilization), got {cap!r}")
        conditions.append((metric, float(cap)))
    fallback = parameters.get("fallbackOnEmpty", False)
    if not isinstance(fallback, bool):
        raise ConfigError(f"plugin {name!r}: fallbackOnEmpty must be true or false, got {fallback!r}")
    producer_name = parameters.get("inFlightLoadProducerName", "")
    producer = inflight_load_producer(ctx, producer_name) if any(m == "active-requests" for m, _ in conditions) else None
    return UtilizationFilter(name, conditions, fallback, producer)
