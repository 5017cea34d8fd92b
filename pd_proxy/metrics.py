"""The proxy's /metrics: its own pdproxy_* series, the KV-transfer profile, and its instances' vllm:* gauges."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
REEXPORT = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
PROGRESS = ("vllm:prompt_tokens", "vllm:generation_tokens")  # counters that move while an engine works
EWMA = 0.2


class ProxyMetrics:
    def __init__(self, kv_backend: str) -> None:
        self.kv_backend = kv_backend
        r = self.registry = CollectorRegistry()
        lb = ("kv_backend",)
        self._in_flight = Gauge("pdproxy_in_flight_requests", "Requests being served.", lb, registry=r)
        self.in_flight = self._in_flight.labels(kv_backend)
        self._requests = Counter("pdproxy_requests", "Requests by final status.", (*lb, "status"), registry=r)
        self.fallbacks = Counter("pdproxy_prefill_fallbacks", "Requests served decode-only after a failed prefill.", lb, registry=r).labels(kv_backend)

        def hist(name: str, doc: str):
            return Histogram(name, doc, lb, buckets=LAT, registry=r).labels(kv_backend)

        self.prefill_seconds = hist("pdproxy_prefill_seconds", "Prefill leg latency.")
        self.kv_transfer_seconds = hist("pdproxy_kv_transfer_seconds", "Time the decode waited for the KV cache.")
        self.decode_seconds = hist("pdproxy_decode_seconds", "Decode leg latency (to the last byte).")
        self.ttft_seconds = hist("pdproxy_ttft_seconds", "Time to the first response byte, prefill included.")
        self.e2e_seconds = hist("pdproxy_e2e_seconds", "End-to-end latency of successful requests.")
        self._prefill_tps = Gauge("pdproxy_prefill_tokens_per_second", "Measured prefill speed (EWMA).", lb, registry=r)
        self._decode_spt = Gauge("pdproxy_decode_seconds_per_token", "Measured decode time per output token (EWMA).", lb, registry=r)
        self._profile = Gauge("pdproxy_kv_transfer_profile_seconds", "Profiled KV transfer time by block count.", (*lb, "blocks"), registry=r)
        self._block_tokens = Gauge("pdproxy_kv_block_tokens", "Tokens per KV block of the profile.", lb, registry=r)
        self._block_bytes = Gauge("pdproxy_kv_block_bytes", "Bytes per KV block of the profile.", lb, registry=r)
        self._vllm: dict[str, Gauge] = {
            name: Gauge(name, f"{name} of the proxy's instances.", ("model_name", "engine", "role", "kv_backend"), registry=r) for name in REEXPORT
        }
        self._tps = self._spt = None

    def finished(self, status: str) -> None:
        self._requests.labels(self.kv_backend, status).inc()

    def observe_prefill_speed(self, tokens_per_second: float) -> None:
        self._tps = tokens_per_second if self._tps is None else (1 - EWMA) * self._tps + EWMA * tokens_per_second
        self._prefill_tps.labels(self.kv_backend).set(self._tps)

    def observe_decode_speed(self, seconds_per_token: float) -> None:
        self._spt = seconds_per_token if self._spt is None else (1 - EWMA) * self._spt + EWMA * seconds_per_token
        self._decode_spt.labels(self.kv_backend).set(self._spt)

    def publish_profile(self, profile: dict) -> None:
        for point in profile.get("points", []):
            self._profile.labels(self.kv_backend, str(point["blocks"])).set(point["seconds"])
        self._block_tokens.labels(self.kv_backend).set(profile.get("block_tokens", 16))
        self._block_bytes.labels(self.kv_backend).set(profile.get("block_bytes", 0))

    def absorb_vllm(self, role: str, index: str, text: str) -> float | None:
        """Re-export an instance's gauges; returns its token counters' sum (None if it has none)."""
        progress = None
        for fam in text_string_to_metric_families(text):
            name = fam.name if fam.name.startswith("vllm:") else None
            if name in PROGRESS:
                progress = (progress or 0.0) + sum(s.value for s in fam.samples if s.name == f"{name}_total")
            if name not in self._vllm:
                continue
            for s in fam.samples:
                if s.name == name:
                    engine = f"{role}-{index}-{s.labels.get('engine', '0')}"
                    self._vllm[name].labels(s.labels.get("model_name", ""), engine, role, self.kv_backend).set(s.value)
        return progress

    def watch_instances(self, views: Callable[[], list[dict]]) -> None:
        """Per-instance health series, read from the proxy's own state at each scrape (no stale series)."""
        self.registry.register(_InstanceCollector(self.kv_backend, views))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _InstanceCollector:
    """pdproxy_instance_* from `HealthTracker.view` dicts: what the EPP reads to see a pair's instances."""

    def __init__(self, kv_backend: str, views: Callable[[], list[dict]]) -> None:
        self.kv_backend, self.views = kv_backend, views

    def collect(self):
        labels = ["kv_backend", "role", "instance"]
        up = GaugeMetricFamily("pdproxy_instance_up", "1 while the instance takes requests; 0 while it is down or ejected.", labels=labels)
        in_flight = GaugeMetricFamily("pdproxy_instance_in_flight", "Requests the proxy has on the instance.", labels=labels)
        ejections = CounterMetricFamily("pdproxy_instance_ejections", "Times the instance was ejected (failures in a row, a stall, a failed probe).",
                                        labels=labels)
        failures = CounterMetricFamily("pdproxy_instance_failures",
                                       "Failed calls and health checks by kind: connect, reset, 5xx, timeout, stall, kv, health.",
                                       labels=[*labels, "kind"])
        for v in self.views():
            key = [self.kv_backend, v["role"], v["instance"]]
            up.add_metric(key, 1.0 if v["up"] else 0.0)
            in_flight.add_metric(key, v["in_flight"])
            ejections.add_metric(key, v["ejections"])
            for kind, n in sorted(v["failures"].items()):
                failures.add_metric([*key, kind], n)
        yield from (up, in_flight, ejections, failures)
