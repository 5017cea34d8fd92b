"""The proxy's /metrics: its own pdproxy_* series, the KV-transfer profile, and its instances' vllm:* gauges."""

from __future__ import annotations

import statistics
from collections import deque
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
REEXPORT = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
PROGRESS = ("vllm:prompt_tokens", "vllm:generation_tokens")  # counters that move while an engine works
SPEED_WINDOW = 16  # speeds published as the median of this many recent measurements


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
        self.decode_first_token_seconds = hist("pdproxy_decode_first_token_seconds",
                                               "Decode leg: from sending it to its first byte (KV load or recompute, then one step).")
        self.e2e_seconds = hist("pdproxy_e2e_seconds", "End-to-end latency of successful requests.")
        self._prefill_tps = Gauge("pdproxy_prefill_tokens_per_second", "Measured prefill speed (median of recent unqueued prefills).", lb, registry=r)
        self._decode_spt = Gauge("pdproxy_decode_seconds_per_token", "Measured decode time per output token (median of recent).", lb, registry=r)
        self._static_profile: list[tuple[int, float]] = []
        self.live_links = None  # sidecar mode: LiveLinkProfiles of the prefill peers
        r.register(_ProfileCollector(self))
        self._block_tokens = Gauge("pdproxy_kv_block_tokens", "Tokens per KV block of the profile.", lb, registry=r)
        self._block_bytes = Gauge("pdproxy_kv_block_bytes", "Bytes per KV block of the profile.", lb, registry=r)
        self._vllm: dict[str, Gauge] = {
            name: Gauge(name, f"{name} of the proxy's instances.", ("model_name", "engine", "role", "kv_backend"), registry=r) for name in REEXPORT
        }
        self.kv_load_failures = Counter("pdproxy_kv_load_failures", "Decode requests that failed loading their KV (NIXL).", lb,
                                        registry=r).labels(kv_backend)
        self._kv_tokens = Counter("pdproxy_decode_prompt_tokens", "Decodes' prompt tokens by source (vLLM's token-source counters).",
                                  (*lb, "source"), registry=r)
        self.kv_recomputed_requests = Counter("pdproxy_kv_recomputed_requests",
                                              "Requests whose decode computed the prompt instead of loading its KV.", lb,
                                              registry=r).labels(kv_backend)
        self._recompute_ratio = Gauge("pdproxy_kv_recompute_ratio",
                                      "Share of the decodes' prompt tokens recomputed instead of loaded (EWMA over reads).", lb, registry=r)
        # medians, not averages: one request caught in a host stall must not move a pair's speed (and its traffic)
        self._tps: deque[float] = deque(maxlen=SPEED_WINDOW)
        self._spt: deque[float] = deque(maxlen=SPEED_WINDOW)
        self._ratio: float | None = None

    def serve_sidecar(self, live_links, block_tokens: int) -> None:
        """Sidecar mode: per prefill peer, requests by outcome and the live link profile; refused targets by reason."""
        r = self.registry
        self.live_links = live_links
        self._block_tokens.labels(self.kv_backend).set(block_tokens)
        self.peer_requests = Counter("pdproxy_prefill_peer_requests",
                                     "Prefill legs by peer (x-prefiller-host-port; empty: none named, the decode prefilled) and outcome: "
                                     "ok, retried, failed, fallback (served decode-only), unavailable (peer down or ejected), local.",
                                     ("kv_backend", "prefill", "outcome"), registry=r)
        self.target_refused = Counter("pdproxy_prefill_target_refused",
                                      "Requests refused because x-prefiller-host-port was malformed or named no prefill pod of the pool.",
                                      ("kv_backend", "reason"), registry=r)

    def finished(self, status: str) -> None:
        self._requests.labels(self.kv_backend, status).inc()

    def observe_prefill_speed(self, tokens_per_second: float) -> None:
        self._tps.append(tokens_per_second)
        self._prefill_tps.labels(self.kv_backend).set(statistics.median(self._tps))

    def observe_decode_speed(self, seconds_per_token: float) -> None:
        self._spt.append(seconds_per_token)
        self._decode_spt.labels(self.kv_backend).set(statistics.median(self._spt))

    def observe_kv_window(self, loaded: float, computed: float, recomputed: float, recomputed_requests: int, ewma: float) -> None:
        """One read of a decode's token-source counters: tokens loaded and computed, and what was recomputed."""
        self._kv_tokens.labels(self.kv_backend, "external_kv_transfer").inc(max(0.0, loaded))
        self._kv_tokens.labels(self.kv_backend, "local_compute").inc(max(0.0, computed))
        self.kv_recomputed_requests.inc(recomputed_requests)
        total = max(0.0, loaded) + max(0.0, computed)
        if total > 0:
            share = recomputed / total
            self._ratio = share if self._ratio is None else (1 - ewma) * self._ratio + ewma * share
            self._recompute_ratio.labels(self.kv_backend).set(self._ratio)

    def publish_profile(self, profile: dict) -> None:
        self._static_profile = [(int(p["blocks"]), float(p["seconds"])) for p in profile.get("points", [])]
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


class _ProfileCollector:
    """pdproxy_kv_transfer_profile_seconds: the profiled backend's points and, in sidecar mode, each prefill peer's live fit."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self.m = metrics

    def collect(self):
        fam = Metric("pdproxy_kv_transfer_profile_seconds",
                     "KV transfer time by block count: the profile file's (no prefill label) and, per prefill peer, measured live.", "gauge")
        for blocks, seconds in self.m._static_profile:
            fam.add_sample(fam.name, {"kv_backend": self.m.kv_backend, "blocks": str(blocks)}, seconds)
        if self.m.live_links is not None:
            for peer, points in sorted(self.m.live_links.profiles().items()):
                for blocks, seconds in points:
                    fam.add_sample(fam.name, {"kv_backend": self.m.kv_backend, "prefill": peer, "blocks": str(blocks)}, seconds)
        yield fam


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
