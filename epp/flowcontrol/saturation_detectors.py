"""Saturation detectors, with llm-d's semantics and parameters; each is also a scheduling filter.

utilization-detector (the default): per endpoint max(waiting/queueDepthThreshold,
kv/kvCacheUtilThreshold), averaged over the candidates; endpoints with missing or stale metrics
count as 1.0 (fail closed) and no candidates is 1.0. As a filter it drops endpoints with stale
metrics or at/over threshold × (1 + headroom), and keeps everything if it would drop everything.

concurrency-detector: in-flight requests (or estimated tokens, or both per endpoint in `hybrid`)
through this EPP against maxConcurrency / maxTokenConcurrency per endpoint. As a filter it drops
endpoints at capacity × (1 + headroom).
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

from epp.datalayer.inflight_load import inflight_load_producer
from epp.datastore.endpoint import Endpoint
from epp.scheduling.framework import ConfigError, CycleState, LLMRequest
from epp.scheduling.registry import PluginContext, positive_duration, register


def _number(name: str, parameters: Mapping[str, Any], key: str, default: float, *, integer: bool = False) -> float:
    value = parameters.get(key, default)
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        raise ConfigError(f"plugin {name!r}: {key} must be {'an integer' if integer else 'a number'}, got {value!r}")
    return value


class UtilizationDetector:
    type_name = "utilization-detector"
    needs_metrics = True

    def __init__(self, name: str, queue_threshold: int = 5, kv_threshold: float = 0.8, staleness: float = 0.2, headroom: float = 0.0) -> None:
        self.name = name
        self.queue_threshold, self.kv_threshold, self.staleness, self.headroom = queue_threshold, kv_threshold, staleness, headroom

    def _fresh(self, e: Endpoint, now: float):
        m = e.metrics
        return m if m.age(now) <= self.staleness else None

    def saturation(self, endpoints: Sequence[Endpoint]) -> float:
        if not endpoints:
            return 1.0
        now = time.monotonic()
        total = 0.0
        for e in endpoints:
            m = self._fresh(e, now)
            if m is None:
                total += 1.0
                continue
            total += max((m.waiting or 0.0) / self.queue_threshold, (m.kv_cache_usage or 0.0) / self.kv_threshold)
        return total / len(endpoints)

    def filter(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        q_limit = self.queue_threshold * (1.0 + self.headroom)
        kv_limit = self.kv_threshold * (1.0 + self.headroom)
        now = time.monotonic()
        kept = []
        for e in endpoints:
            m = self._fresh(e, now)
            if m is not None and (m.waiting or 0.0) < q_limit and (m.kv_cache_usage or 0.0) < kv_limit:
                kept.append(e)
        return kept or list(endpoints)


class ConcurrencyDetector:
    type_name = "concurrency-detector"

    def __init__(self, name: str, producer: Any, mode: str = "requests", max_concurrency: int = 100,
                 max_tokens: int = 1_000_000, headroom: float = 0.0) -> None:
        self.name, self.producer, self.mode = name, producer, mode
        self.max_concurrency, self.max_tokens, self.headroom = max_concurrency, max_tokens, headroom

    def saturation(self, endpoints: Sequence[Endpoint]) -> float:
        if not endpoints:
            return 1.0
        loads = [self.producer.load(e.key) for e in endpoints]
        n = len(endpoints)
        if self.mode == "tokens":
            return sum(t for _, t in loads) / (self.max_tokens * n)
        if self.mode == "hybrid":
            return sum(max(r / self.max_concurrency, t / self.max_tokens) for r, t in loads) / n
        return sum(r for r, _ in loads) / (self.max_concurrency * n)

    def filter(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        req_limit = int(self.max_concurrency * (1.0 + self.headroom))
        tok_limit = int(self.max_tokens * (1.0 + self.headroom))
        kept = []
        for e in endpoints:
            r, t = self.producer.load(e.key)
            if self.mode == "tokens":
                ok = t < tok_limit
            elif self.mode == "hybrid":
                ok = r < req_limit and t < tok_limit
            else:
                ok = r < req_limit
            if ok:
                kept.append(e)
        return kept


@register("utilization-detector")
def _utilization(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> UtilizationDetector:
    queue = _number(name, parameters, "queueDepthThreshold", 5, integer=True)
    kv = _number(name, parameters, "kvCacheUtilThreshold", 0.8)
    headroom = _number(name, parameters, "headroom", 0.0)
    staleness = positive_duration(name, parameters, "metricsStalenessThreshold", "200ms")
    problems = []
    if queue <= 0:
        problems.append(f"queueDepthThreshold must be strictly positive, got {queue}")
    if not 0.0 < kv <= 1.0:
        problems.append(f"kvCacheUtilThreshold must be in (0.0, 1.0], got {kv}")
    if headroom < 0:
        problems.append(f"headroom must be a non-negative value, got {headroom}")
    if problems:
        raise ConfigError(f"plugin {name!r}: " + "; ".join(problems))
    return UtilizationDetector(name, int(queue), float(kv), staleness, float(headroom))


@register("concurrency-detector")
def _concurrency(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> ConcurrencyDetector:
    mode = parameters.get("concurrencyMode", "requests")
    max_c = _number(name, parameters, "maxConcurrency", 100, integer=True)
    max_t = _number(name, parameters, "maxTokenConcurrency", 1_000_000, integer=True)
    headroom = _number(name, parameters, "headroom", 0.0)
    producer_name = parameters.get("inFlightLoadProducerName", "")
    problems = []
    if mode not in ("requests", "tokens", "hybrid"):
        problems.append(f"unsupported concurrencyMode: {mode!r} (requests, tokens or hybrid)")
    if max_c <= 0:
        problems.append(f"maxConcurrency must be strictly positive, got {max_c}")
    if max_t <= 0:
        problems.append(f"maxTokenConcurrency must be strictly positive, got {max_t}")
    if headroom < 0:
        problems.append(f"headroom must be a non-negative value, got {headroom}")
    if not isinstance(producer_name, str):
        problems.append(f"inFlightLoadProducerName must be a string, got {producer_name!r}")
    if problems:
        raise ConfigError(f"plugin {name!r}: " + "; ".join(problems))
    return ConcurrencyDetector(name, inflight_load_producer(ctx, producer_name), mode, int(max_c), int(max_t), float(headroom))
