"""Prometheus metrics under llm-d's `llm_d_epp_*` names and GIE's deprecated twins, one registry per server.

Every value is stored once and exposed under both names at scrape time, so the twin costs nothing
on the request path; the text is written directly from plain Python values (see `Text`). Label values a client controls (model names, fairness id) are bounded: the
first N distinct values of routed requests keep their name, later ones are reported as `other`
(as llm-d does, with a smaller default so that a flood of invented model names cannot grow
`/metrics`). Refused requests never admit a new value. Per-request series are created lazily,
on their first observation. Exposition runs off the event loop (`metrics_server.py`); the
renderers copy their dicts before walking them, which is atomic under the GIL.
"""

from __future__ import annotations

from bisect import bisect_left
from functools import lru_cache
from math import sqrt
from typing import Any, Iterable, Sequence

from prometheus_client import CollectorRegistry, generate_latest

_LATENCY_BUCKETS = (0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 45, 60, 120, 180, 240, 300, 360, 480, 600, 900, 1200, 1800, 2700, 3600)
_SCHED_BUCKETS = (0.00001, 0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
_SIZE_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576, 2097152, 4194304, 8388608, 16777216, 33554432, 67108864, 134217728, 268435456, 536870912, 1073741824)
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32778, 65536, 131072, 262144, 524288, 1048576)
_NTPOT_BUCKETS = _SCHED_BUCKETS + (0.2, 0.5, 1.0)

OVERFLOW = "other"
DEFAULT_FLOW = "default-flow"  # GIE/llm-d fairness id when the request names none
FAIRNESS_HEADERS = ("x-llm-d-inference-fairness-id", "x-gateway-inference-fairness-id")
DEFAULT_MODEL_LABEL_LIMIT = 16
DEFAULT_FAIRNESS_LABEL_LIMIT = 16
MAX_LABEL_VALUE = 128  # characters kept of a client-chosen label value
ENDPOINT_LABEL_LIMIT = 1000  # endpoints come from discovery, but pods restart under new addresses

_GIE_MODEL = ("model_name", "target_model_name")
_LLMD_MODEL = ("model_name", "target_model_name", "fairness_id", "priority")


class BoundedLabel:
    """The first `limit` distinct values keep their name; later ones read as `other`, for the process's life."""

    __slots__ = ("limit", "admitted")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.admitted: set[str] = set()

    def bound(self, value: str, admit: bool = True) -> str:
        value = value[:MAX_LABEL_VALUE]
        if value in self.admitted or value == "":
            return value
        if admit and len(self.admitted) < self.limit:
            self.admitted.add(value)
            return value
        return OVERFLOW


class Hist:
    """Bucket counts and sum of one labelled histogram series: observe() is a bisect and two adds."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class _Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount


class _LazyHist:
    """A histogram slot of a RequestSeries, created on the first observation."""

    __slots__ = ("series", "slot", "bounds")

    def __init__(self, series: "RequestSeries", slot: str, bounds: Sequence[float]) -> None:
        self.series, self.slot, self.bounds = series, slot, bounds

    def observe(self, value: float) -> None:
        h = self.series.hists.get(self.slot)
        if h is None:
            h = self.series.hists[self.slot] = Hist(self.bounds)
        h.observe(value)


# slot -> (GIE name, llm-d name, help, buckets)
_REQUEST_HISTOGRAMS = {
    "request_duration": ("inference_objective_request_duration_seconds", "llm_d_epp_request_duration_seconds",
                         "Request latency seen by the EPP (body received → response end).", _LATENCY_BUCKETS),
    "request_sizes": ("inference_objective_request_sizes", "llm_d_epp_request_size_bytes", "Request body size in bytes.", _SIZE_BUCKETS),
    "response_sizes": ("inference_objective_response_sizes", "llm_d_epp_response_size_bytes", "Response body size in bytes.", _SIZE_BUCKETS),
    "input_tokens": ("inference_objective_input_tokens", "llm_d_epp_request_input_tokens", "Prompt tokens (usage).", _TOKEN_BUCKETS),
    "output_tokens": ("inference_objective_output_tokens", "llm_d_epp_request_output_tokens", "Completion tokens (usage).", _TOKEN_BUCKETS),
    "normalized_tpot": ("inference_objective_normalized_time_per_output_token_seconds", "llm_d_epp_request_ntpot_seconds",
                        "End-to-end latency divided by output tokens.", _NTPOT_BUCKETS),
}


class RequestSeries:
    """The request metrics of one label set (model, target model, fairness id, priority).

    Attribute names match what the director records: `request_total.inc()`,
    `request_sizes.observe(n)`, `running.inc()/dec()`, `error(code).inc()`, ….
    """

    __slots__ = ("labels", "request_total", "running", "errors", "hists", *_REQUEST_HISTOGRAMS)

    def __init__(self, labels: tuple[str, str, str, str]) -> None:
        self.labels = labels
        self.request_total = _Count()
        self.running = _Count()
        self.errors: dict[str, _Count] = {}
        self.hists: dict[str, Hist] = {}
        for slot, (_, _, _, bounds) in _REQUEST_HISTOGRAMS.items():
            setattr(self, slot, _LazyHist(self, slot, bounds))

    def error(self, code: str) -> _Count:
        c = self.errors.get(code)
        if c is None:
            c = self.errors[code] = _Count()
        return c


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


@lru_cache(maxsize=8192)
def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    """`a="x",b="y"` for one label set, sorted by name as prometheus_client writes it, escaped once and cached."""
    return ",".join(f'{n}="{_escape(v)}"' for n, v in sorted(zip(names, values)))


def _num(v: float) -> str:
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class Text:
    """Prometheus text format 0.0.4 written directly: prometheus_client validates and escapes every
    sample again at each scrape (~70 µs a line here), which made a scrape hold the GIL for ~0.4 s."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[str] = []

    def family(self, name: str, doc: str, kind: str) -> None:
        self.parts.append(f"# HELP {name} {doc.replace(chr(92), chr(92) * 2).replace(chr(10), chr(92) + 'n')}\n# TYPE {name} {kind}\n")

    def gauge(self, name: str, doc: str, names: Sequence[str], rows: Iterable[tuple[Sequence[str], float]], kind: str = "gauge") -> None:
        self.family(name, doc, kind)
        names = tuple(names)
        p = self.parts
        for values, v in rows:
            ls = _labels(names, tuple(values))
            p.append(f"{name}{{{ls}}} {_num(v)}\n" if ls else f"{name} {_num(v)}\n")

    def counter(self, name: str, doc: str, names: Sequence[str], rows: Iterable[tuple[Sequence[str], float]]) -> None:
        self.gauge(name, doc, names, rows, "counter")

    def histogram(self, name: str, doc: str, names: Sequence[str], rows: Iterable[tuple[Sequence[str], "Hist"]]) -> None:
        self.family(name, doc, "histogram")
        names = tuple(names)
        p = self.parts
        for values, h in rows:
            ls = _labels(names, tuple(values))
            sep = "," if ls else ""
            total = 0
            for le, n in zip(_le_strings(h.bounds), h.counts):
                total += n
                p.append(f'{name}_bucket{{{ls}{sep}le="{le}"}} {total}.0\n')
            tail = f"{{{ls}}}" if ls else ""
            p.append(f"{name}_count{tail} {total}.0\n{name}_sum{tail} {_num(h.sum)}\n")

    def bytes(self) -> bytes:
        return "".join(self.parts).encode()


@lru_cache(maxsize=64)
def _le_strings(bounds: tuple[float, ...]) -> tuple[str, ...]:
    return (*(repr(float(b)) for b in bounds), "+Inf")


def _merge(hists: Iterable[Hist]) -> Hist:
    it = iter(hists)
    first = next(it)
    out = Hist(first.bounds)
    out.counts, out.sum = list(first.counts), first.sum
    for h in it:
        out.counts = [a + b for a, b in zip(out.counts, h.counts)]
        out.sum += h.sum
    return out


class _RequestMetrics:
    """Writes every RequestSeries under the llm-d names (all labels) and GIE's (model labels only)."""

    def __init__(self, m: "EPPMetrics") -> None:
        self.m = m

    def render(self, t: Text) -> None:
        series = list(self.m._series.values())
        gie_key = lambda s: s.labels[:2]  # noqa: E731
        t.counter("llm_d_epp_request_total", "Requests per model.", _LLMD_MODEL, ((s.labels, s.request_total.value) for s in series))
        t.counter("inference_objective_request_total", "[Deprecated: use llm_d_epp_request_total] Requests per model.", _GIE_MODEL,
                       _sum_by(series, gie_key, lambda s: s.request_total.value))
        errors = [(s, code, c.value) for s in series for code, c in list(s.errors.items())]
        t.counter("llm_d_epp_request_error_total", "Requests that failed, by GIE error code.", (*_LLMD_MODEL, "error_code"),
                       (((*s.labels, code), v) for s, code, v in errors))
        gie_err: dict[tuple[str, ...], float] = {}
        for s, code, v in errors:
            k = (*s.labels[:2], code)
            gie_err[k] = gie_err.get(k, 0.0) + v
        t.counter("inference_objective_request_error_total", "[Deprecated: use llm_d_epp_request_error_total] Requests that failed, by GIE error code.",
                       (*_GIE_MODEL, "error_code"), gie_err.items())
        t.gauge("llm_d_epp_request_running", "Requests in flight through the EPP.", _LLMD_MODEL, ((s.labels, s.running.value) for s in series))
        t.gauge("inference_objective_running_requests", "[Deprecated: use llm_d_epp_request_running] Requests in flight through the EPP.",
                     ("model_name",), _sum_by(series, lambda s: s.labels[:1], lambda s: s.running.value))
        for slot, (gie, llmd, doc, _) in _REQUEST_HISTOGRAMS.items():
            rows = [(s.labels, s.hists[slot]) for s in series if slot in s.hists]
            t.histogram(llmd, doc, _LLMD_MODEL, rows)
            grouped: dict[tuple[str, ...], list[Hist]] = {}
            for labels, h in rows:
                grouped.setdefault(labels[:2], []).append(h)
            t.histogram(gie, f"[Deprecated: use {llmd}] {doc}", _GIE_MODEL, ((k, _merge(v)) for k, v in grouped.items()))


def _sum_by(series: Sequence[RequestSeries], key, value) -> list[tuple[tuple[str, ...], float]]:
    out: dict[tuple[str, ...], float] = {}
    for s in series:
        k = key(s)
        out[k] = out.get(k, 0.0) + value(s)
    return list(out.items())


class TwinHistogram:
    """A labelled histogram exposed under an llm-d name and its GIE twin (single-threaded observe)."""

    def __init__(self, names: tuple[str, str], documentation: str, labelnames: Sequence[str], buckets: Sequence[float]) -> None:
        self.names, self.documentation = names, documentation
        self.labelnames = list(labelnames)
        self.bounds = tuple(buckets)
        self.series: dict[tuple[str, ...], Hist] = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        h = self.series.get(labels)
        if h is None:
            h = self.series[labels] = Hist(self.bounds)
        h.observe(value)

    def render(self, t: Text) -> None:
        rows = list(self.series.items())
        llmd, gie = self.names
        t.histogram(llmd, self.documentation, self.labelnames, rows)
        t.histogram(gie, f"[Deprecated: use {llmd}] {self.documentation}", self.labelnames, rows)


class _PoolMetrics:
    """Pool gauges computed at scrape time from the datastore's endpoints."""

    def __init__(self, m: "EPPMetrics") -> None:
        self.m = m
        self.endpoints: Any = lambda: ()

    def render(self, t: Text) -> None:
        eps = list(self.endpoints())
        name = (self.m.pool_name,)
        kv = [e.metrics.kv_cache_usage for e in eps if e.metrics.kv_cache_usage is not None]
        queue = [e.metrics.waiting for e in eps if e.metrics.waiting is not None]
        running = [e.metrics.running for e in eps if e.metrics.running is not None]
        for llmd, gie, doc, values in (
            ("llm_d_epp_average_kv_cache_utilization", "inference_pool_average_kv_cache_utilization", "Mean KV-cache utilisation over endpoints.", kv),
            ("llm_d_epp_average_queue_size", "inference_pool_average_queue_size", "Mean waiting requests over endpoints.", queue),
            ("llm_d_epp_average_running_requests", "inference_pool_average_running_requests", "Mean running requests over endpoints.", running),
        ):
            mean = sum(values) / len(values) if values else 0.0
            t.gauge(llmd, doc, ("name",), [(name, mean)])
            t.gauge(gie, f"[Deprecated: use {llmd}] {doc}", ("name",), [(name, mean)])
            std = sqrt(sum((v - mean) ** 2 for v in values) / len(values)) if values else 0.0
            t.gauge(llmd.replace("_average_", "_std_dev_"), doc.replace("Mean", "Standard deviation of"), ("name",), [(name, std)])
        per = [((self.m.pool_name, e.name), e.metrics.waiting) for e in eps if e.metrics.waiting is not None]
        t.gauge("llm_d_epp_per_endpoint_queue_size", "Waiting requests on each endpoint (its last scrape).", ("name", "model_server_endpoint"), per)
        t.gauge("inference_pool_per_pod_queue_size", "[Deprecated: use llm_d_epp_per_endpoint_queue_size] Waiting requests on each endpoint.",
                ("name", "model_server_pod"), per)
        t.gauge("llm_d_epp_ready_endpoints", "Endpoints known to the EPP.", ("name",), [(name, len(eps))])
        t.gauge("inference_pool_ready_pods", "[Deprecated: use llm_d_epp_ready_endpoints] Endpoints known to the EPP.", ("name",), [(name, len(eps))])


class _SelectionMetrics:
    def __init__(self, m: "EPPMetrics") -> None:
        self.m = m

    def render(self, t: Text) -> None:
        rows = [(k, c.value) for k, c in list(self.m._selections.items())]
        t.counter("inference_epp_endpoint_selections_total", "Requests routed to each endpoint (primary pick).", ("endpoint", "kv_backend"), rows)
        attempts = [(k, c.value) for k, c in list(self.m._attempts.items())]
        names = ("status", "target_model_name", "endpoint_name", "namespace", "port")
        doc = "Scheduling attempts: success with the primary endpoint, failure without."
        t.counter("llm_d_epp_scheduler_attempts_total", doc, names, attempts)
        t.counter("inference_extension_scheduler_attempts_total", f"[Deprecated: use llm_d_epp_scheduler_attempts_total] {doc}", names, attempts)


class _BudgetMetrics:
    def __init__(self, budget: Any) -> None:
        self.budget = budget

    def render(self, t: Text) -> None:
        b = self.budget
        t.gauge("inference_epp_buffered_request_bytes", "Request body bytes held by all ext_proc streams now.", (), [((), b.held)])
        t.gauge("inference_epp_buffered_request_bytes_limit", "--max-buffered-body-bytes (0: unbounded).", (), [((), b.limit)])
        t.counter("inference_epp_buffered_request_refusals_total", "Requests refused with 429 because the body budget was full.", (), [((), b.refused)])


class EPPMetrics:
    def __init__(self, pool_name: str = "", registry: CollectorRegistry | None = None,
                 model_label_limit: int = DEFAULT_MODEL_LABEL_LIMIT, fairness_label_limit: int = DEFAULT_FAIRNESS_LABEL_LIMIT) -> None:
        self.registry = registry or CollectorRegistry()  # for metrics other modules add; rendered after ours
        self.pool_name = pool_name
        self.models = BoundedLabel(model_label_limit)
        self.fairness = BoundedLabel(fairness_label_limit)
        self.endpoint_labels = BoundedLabel(ENDPOINT_LABEL_LIMIT)
        self._series: dict[tuple[str, str, str, str], RequestSeries] = {}
        self._selections: dict[tuple[str, str], _Count] = {}
        self._attempts: dict[tuple[str, ...], _Count] = {}
        self.pool = _PoolMetrics(self)
        self.scheduler_e2e = TwinHistogram(
            ("llm_d_epp_scheduler_e2e_duration_seconds", "inference_extension_scheduler_e2e_duration_seconds"),
            "Time of one scheduling cycle.", (), _SCHED_BUCKETS,
        )
        self.plugin_duration = TwinHistogram(
            ("llm_d_epp_plugin_duration_seconds", "inference_extension_plugin_duration_seconds"),
            "Time spent in each plugin call.", ("extension_point", "plugin_type", "plugin_name"), _SCHED_BUCKETS,
        )
        self._renderers: list[Any] = [_RequestMetrics(self), self.pool, _SelectionMetrics(self), self.scheduler_e2e, self.plugin_duration]

    def render(self) -> bytes:
        """The whole exposition: this module's metrics written directly, then anything else in `registry`."""
        t = Text()
        for r in list(self._renderers):
            r.render(t)
        build = (("", "inference-epp"),)
        t.gauge("llm_d_epp_info", "Build information.", ("commit", "build_ref"), [(b, 1.0) for b in build])
        t.gauge("inference_extension_info", "[Deprecated: use llm_d_epp_info] Build information.", ("commit", "build_ref"), [(b, 1.0) for b in build])
        return t.bytes() + generate_latest(self.registry)

    def observe_plugin(self, point: str, plugin_type: str, plugin_name: str, seconds: float) -> None:
        """Scheduler observer: runs several times per request."""
        self.plugin_duration.observe((point, plugin_type, plugin_name), seconds)

    def series_for(self, request: Any, admit: bool = False) -> RequestSeries:
        """The series of a request's label set. Only routed requests (`admit=True`) may add new label values."""
        if request is None:
            model = target = ""
            fairness, priority = DEFAULT_FLOW, "0"
        else:
            model, target = request.model, request.target_model
            headers = request.headers
            fairness = next((headers[h] for h in FAIRNESS_HEADERS if headers.get(h)), DEFAULT_FLOW)
            priority = str(getattr(request, "priority", 0) or 0)
        labels = (self.models.bound(model, admit), self.models.bound(target, admit), self.fairness.bound(fairness, admit), priority)
        s = self._series.get(labels)
        if s is None:
            s = self._series[labels] = RequestSeries(labels)
        return s

    def request_series(self) -> list[RequestSeries]:
        return list(self._series.values())

    def scheduler_attempt(self, request: Any, primary: Any) -> None:
        """llm-d's scheduler_attempts_total: success with the primary endpoint, or failure with empty endpoint labels."""
        target = self.models.bound(request.target_model, False)
        if primary is None:
            key = ("failure", target, "", "", "")
        else:
            key = ("success", target, self.endpoint_labels.bound(primary.name), primary.namespace, str(primary.port))
        c = self._attempts.get(key)
        if c is None:
            c = self._attempts[key] = _Count()
        c.inc()

    def selection(self, hostport: str, kv_backend: str) -> _Count:
        key = (self.endpoint_labels.bound(hostport), kv_backend)
        c = self._selections.get(key)
        if c is None:
            c = self._selections[key] = _Count()
        return c

    def watch_body_budget(self, budget: Any) -> None:
        """`inference_epp_buffered_request_bytes`: request bytes all streams hold now (and its limit)."""
        self._renderers.append(_BudgetMetrics(budget))

    def before_render(self, refresh: Any) -> None:
        """Call `refresh()` at each scrape before anything is written (gauges read at exposition time)."""
        self._renderers.insert(0, _Refresh(refresh))

    def watch_pool(self, endpoints) -> None:
        """Pool gauges read `endpoints()` at each scrape."""
        self.pool.endpoints = endpoints


class _Refresh:
    """A renderer that writes nothing: it updates other collectors just before the exposition."""

    __slots__ = ("refresh",)

    def __init__(self, refresh: Any) -> None:
        self.refresh = refresh

    def render(self, t: "Text") -> None:
        self.refresh()
