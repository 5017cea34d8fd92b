"""Scorers on model-server metrics, as GIE and llm-d define them.

queue-scorer and running-requests-size-scorer: min-max normalised over the candidates, (max−q)/(max−min),
all equal → 1. kv-cache-utilization-scorer: 1 − usage. load-aware-scorer (llm-d): empty queue 0.5,
else 0.5 × (1 − min(q, threshold)/threshold). Endpoints with no or stale metrics count as idle
and are named in the decision log, so a dead scraper is visible rather than silently steering.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

from epp.datastore.endpoint import Endpoint, EndpointMetrics
from epp.scheduling.framework import ConfigError, CycleState, LLMRequest
from epp.scheduling.registry import PluginContext, register

DEFAULT_STALENESS = 2.0


class MetricScorer:
    needs_metrics = True

    def __init__(self, type_name: str, name: str, staleness: float) -> None:
        self.type_name, self.name, self.staleness = type_name, name, staleness

    def values(self, state: CycleState, endpoints: Sequence[Endpoint], get: Callable[[EndpointMetrics], float | None]) -> list[float | None]:
        now = time.monotonic()
        out: list[float | None] = []
        missing = []
        for e in endpoints:
            m = e.metrics
            v = get(m) if m.age(now) <= self.staleness else None
            if v is None:
                missing.append(e.key)
            out.append(v)
        if missing:
            state.notes[self.name] = {"no_fresh_metrics": missing}
        return out


class MinMaxScorer(MetricScorer):
    def __init__(self, type_name: str, name: str, staleness: float, field: str) -> None:
        super().__init__(type_name, name, staleness)
        self.field = field

    def score(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        vals = [0.0 if v is None else v for v in self.values(state, endpoints, lambda m: getattr(m, self.field))]
        lo, hi = min(vals, default=0.0), max(vals, default=0.0)
        if hi == lo:
            return [1.0] * len(vals)
        return [(hi - v) / (hi - lo) for v in vals]


class KVCacheUtilizationScorer(MetricScorer):
    def score(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        return [1.0 - (v or 0.0) for v in self.values(state, endpoints, lambda m: m.kv_cache_usage)]


class LoadAwareScorer(MetricScorer):
    def __init__(self, name: str, staleness: float, threshold: int) -> None:
        super().__init__("load-aware-scorer", name, staleness)
        self.threshold = threshold

    def score(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        t = self.threshold
        return [0.5 if not q else 0.5 * (1.0 - min(q, t) / t) for q in self.values(state, endpoints, lambda m: m.waiting)]


def staleness_of(ctx: PluginContext) -> float:
    return float((ctx.services or {}).get("metrics_staleness", DEFAULT_STALENESS))


@register("queue-scorer")
def _queue(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> MinMaxScorer:
    return MinMaxScorer("queue-scorer", name, staleness_of(ctx), "waiting")


@register("running-requests-size-scorer")
def _running(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> MinMaxScorer:
    return MinMaxScorer("running-requests-size-scorer", name, staleness_of(ctx), "running")


@register("kv-cache-utilization-scorer", aliases=("kv-cache-scorer",))
def _kv(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> KVCacheUtilizationScorer:
    return KVCacheUtilizationScorer("kv-cache-utilization-scorer", name, staleness_of(ctx))


@register("load-aware-scorer")
def _load_aware(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> LoadAwareScorer:
    threshold = parameters.get("threshold", 128)
    if not isinstance(threshold, int) or isinstance(threshold, bool):
        raise ConfigError(f"plugin {name!r}: threshold must be an integer, got {threshold!r}")
    return LoadAwareScorer(name, staleness_of(ctx), threshold if threshold > 0 else 128)
