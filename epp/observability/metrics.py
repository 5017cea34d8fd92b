"""Prometheus metrics under GIE's names, on a registry of their own (one per server)."""

from __future__ import annotations

from bisect import bisect_left
from typing import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 45, 60, 120, 180, 240, 300, 360, 480, 600, 900, 1200, 1800, 2700, 3600)
_SCHED_BUCKETS = (0.00001, 0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
_SIZE_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576, 2097152, 4194304, 8388608, 16777216, 33554432, 67108864, 134217728, 268435456, 536870912, 1073741824)
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32778, 65536, 131072, 262144, 524288, 1048576)


class FastHistogram(Collector):
    """A labelled histogram whose observe() is a bisect and two adds.

    prometheus_client's Histogram takes a lock and walks its buckets in Python; the scheduler
    observes several plugin timings per request, so this keeps that cost out of the hot path.
    Single-threaded use (the asyncio loop) is assumed; the exposition format is the standard one.
    """

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self.labelnames = list(labelnames)
        self.bounds = list(buckets)
        self.series: dict[tuple[str, ...], list] = {}  # labels -> [bucket counts..., sum]
        registry.register(self)

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        s = self.series.get(labels)
        if s is None:
            s = self.series[labels] = [0] * (len(self.bounds) + 1) + [0.0]
        s[bisect_left(self.bounds, value)] += 1
        s[-1] += value

    def collect(self) -> Iterator[HistogramMetricFamily]:
        fam = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, s in list(self.series.items()):
            cumulative, buckets = 0, []
            for bound, n in zip(self.bounds + [float("inf")], s[:-1]):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
            fam.add_metric(list(labels), buckets, s[-1])
        yield fam

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)


class EPPMetrics:
    def __init__(self, pool_name: str = "", registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.pool_name = pool_name
        m = ("model_name", "target_model_name")
        self.request_total = Counter("inference_objective_request_total", "Requests per model.", m, registry=r)
        self.request_error_total = Counter(
            "inference_objective_request_error_total", "Requests that failed, by GIE error code.", (*m, "error_code"), registry=r
        )
        self.request_duration = Histogram(
            "inference_objective_request_duration_seconds", "Request latency seen by the EPP (body received → response end).", m, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.request_sizes = Histogram("inference_objective_request_sizes", "Request body size in bytes.", m, buckets=_SIZE_BUCKETS, registry=r)
        self.response_sizes = Histogram("inference_objective_response_sizes", "Response body size in bytes.", m, buckets=_SIZE_BUCKETS, registry=r)
        self.input_tokens = Histogram("inference_objective_input_tokens", "Prompt tokens (usage).", m, buckets=_TOKEN_BUCKETS, registry=r)
        self.output_tokens = Histogram("inference_objective_output_tokens", "Completion tokens (usage).", m, buckets=_TOKEN_BUCKETS, registry=r)
        self.running_requests = Gauge("inference_objective_running_requests", "Requests in flight through the EPP.", ("model_name",), registry=r)
        self.normalized_ttft = Histogram(
            "inference_objective_normalized_time_per_output_token_seconds", "End-to-end latency divided by output tokens.", m, buckets=_SCHED_BUCKETS + (0.2, 0.5, 1.0), registry=r
        )
        self.pool_ready_pods = Gauge("inference_pool_ready_pods", "Endpoints known to the EPP.", ("name",), registry=r)
        self.pool_avg_kv = Gauge("inference_pool_average_kv_cache_utilization", "Mean KV-cache utilisation over endpoints.", ("name",), registry=r)
        self.pool_avg_queue = Gauge("inference_pool_average_queue_size", "Mean waiting requests over endpoints.", ("name",), registry=r)
        self.scheduler_e2e = FastHistogram(
            "inference_extension_scheduler_e2e_duration_seconds", "Time of one scheduling cycle.", (), _SCHED_BUCKETS, r
        )
        self.plugin_duration = FastHistogram(
            "inference_extension_plugin_duration_seconds", "Time spent in each plugin call.", ("extension_point", "plugin_type", "plugin_name"), _SCHED_BUCKETS, r
        )
        self.selections = Counter(
            "inference_epp_endpoint_selections_total", "Requests routed to each endpoint (primary pick).", ("endpoint", "kv_backend"), registry=r
        )
        self.info = Info("inference_extension", "Build information.", registry=r)
        self.info.info({"commit": "", "build_ref": "inference-epp"})
        self._per_model: dict[tuple[str, str], ModelSeries] = {}

    def observe_plugin(self, point: str, plugin_type: str, plugin_name: str, seconds: float) -> None:
        """Scheduler observer: runs several times per request."""
        self.plugin_duration.observe((point, plugin_type, plugin_name), seconds)

    def model(self, model: str, target: str) -> "ModelSeries":
        """The labelled children of one (model, target model) pair, looked up once."""
        series = self._per_model.get((model, target))
        if series is None:
            series = self._per_model[(model, target)] = ModelSeries(self, model, target)
        return series

    def update_pool(self, endpoints) -> None:
        n = len(endpoints)
        self.pool_ready_pods.labels(self.pool_name).set(n)
        kv = [e.metrics.kv_cache_usage for e in endpoints if e.metrics.kv_cache_usage is not None]
        q = [e.metrics.waiting for e in endpoints if e.metrics.waiting is not None]
        self.pool_avg_kv.labels(self.pool_name).set(sum(kv) / len(kv) if kv else 0.0)
        self.pool_avg_queue.labels(self.pool_name).set(sum(q) / len(q) if q else 0.0)


class ModelSeries:
    """Per-model children of the request metrics (prometheus .labels() is too slow per request)."""

    __slots__ = ("request_total", "request_sizes", "request_duration", "response_sizes", "input_tokens", "output_tokens",
                 "normalized_tpot", "running", "_errors", "_m", "model", "target")

    def __init__(self, m: EPPMetrics, model: str, target: str) -> None:
        self._m, self.model, self.target = m, model, target
        self.request_total = m.request_total.labels(model, target)
        self.request_sizes = m.request_sizes.labels(model, target)
        self.request_duration = m.request_duration.labels(model, target)
        self.response_sizes = m.response_sizes.labels(model, target)
        self.input_tokens = m.input_tokens.labels(model, target)
        self.output_tokens = m.output_tokens.labels(model, target)
        self.normalized_tpot = m.normalized_ttft.labels(model, target)
        self.running = m.running_requests.labels(model)
        self._errors: dict[str, object] = {}

    def error(self, code: str):
        c = self._errors.get(code)
        if c is None:
            c = self._errors[code] = self._m.request_error_total.labels(self.model, self.target, code)
        return c
