"""Data-layer plugins of the `dataLayer` section: where endpoint metrics and endpoints come from.

metrics-data-source: how each endpoint's Prometheus metrics are fetched (`scheme`, `path`,
`insecureSkipVerify`); the scraper uses it for every endpoint without its own metrics URL.
core-metrics-extractor (GIE v1.3–v1.4: model-server-protocol-metrics): which engine's metric
names are read; vLLM's (`vllm:num_requests_waiting`, `vllm:num_requests_running`,
`vllm:kv_cache_usage_perc`, `vllm:cache_config_info`) are built in, and an engine this EPP cannot
read is refused rather than silently mis-read.
file-discovery (`dataLayer.discovery`): endpoints from a YAML file instead of Kubernetes.
"""

from __future__ import annotations

from typing import Any, Mapping

from epp.scheduling.framework import ConfigError
from epp.scheduling.registry import PluginContext, register

ENGINE_LABEL = "llm-d.ai/engine-type"
SUPPORTED_ENGINES = ("vllm",)


class MetricsDataSource:
    type_name = "metrics-data-source"
    data_source = True

    def __init__(self, name: str, scheme: str = "http", path: str = "/metrics", insecure_skip_verify: bool = True) -> None:
        self.name, self.scheme, self.path, self.insecure_skip_verify = name, scheme, path, insecure_skip_verify


class CoreMetricsExtractor:
    type_name = "core-metrics-extractor"
    data_extractor = True

    def __init__(self, name: str, type_name: str, engine_label: str, default_engine: str) -> None:
        self.name, self.type_name, self.engine_label, self.default_engine = name, type_name, engine_label, default_engine


class FileDiscovery:
    type_name = "file-discovery"
    endpoint_discovery = True

    def __init__(self, name: str, path: str, watch: bool) -> None:
        self.name, self.path, self.watch = name, path, watch


def _bool(name: str, parameters: Mapping[str, Any], key: str, default: bool) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"plugin {name!r}: {key} must be true or false, got {value!r}")
    return value


@register("metrics-data-source")
def _metrics_source(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> MetricsDataSource:
    scheme = parameters.get("scheme", "http")
    path = parameters.get("path", "/metrics")
    if scheme not in ("http", "https"):
        raise ConfigError(f"plugin {name!r}: scheme must be http or https, got {scheme!r}")
    if not isinstance(path, str) or not path.startswith("/"):
        raise ConfigError(f"plugin {name!r}: path must be an absolute URL path such as /metrics, got {path!r}")
    return MetricsDataSource(name, scheme, path, _bool(name, parameters, "insecureSkipVerify", True))


def _extractor(type_name: str):
    def factory(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> CoreMetricsExtractor:
        label = parameters.get("engineLabelKey", ENGINE_LABEL)
        engine = parameters.get("defaultEngine", "vllm")
        if not isinstance(label, str) or not label:
            raise ConfigError(f"plugin {name!r}: engineLabelKey must be a label key, got {label!r}")
        if engine not in SUPPORTED_ENGINES:
            raise ConfigError(f"plugin {name!r}: defaultEngine {engine!r} is not implemented here; this EPP reads "
                              f"{', '.join(SUPPORTED_ENGINES)} metrics (vllm:num_requests_waiting, vllm:num_requests_running, vllm:kv_cache_usage_perc)")
        if parameters.get("engineConfigs"):
            raise ConfigError(f"plugin {name!r}: engineConfigs is not implemented here; the built-in vllm metric names are read")
        return CoreMetricsExtractor(name, type_name, label, engine)

    return factory


register("core-metrics-extractor")(_extractor("core-metrics-extractor"))
register("model-server-protocol-metrics")(_extractor("model-server-protocol-metrics"))


@register("file-discovery")
def _file_discovery(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> FileDiscovery:
    path = parameters.get("path")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"plugin {name!r}: path is required: the endpoints file (YAML with an 'endpoints' list)")
    return FileDiscovery(name, path, _bool(name, parameters, "watchFile", False))
