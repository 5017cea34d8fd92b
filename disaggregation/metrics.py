"""llm-d's disaggregation decision counters, on the EPP's metrics registry.

`llm_d_epp_disagg_decision_total` (disagg-profile-handler) and `llm_d_epp_pd_decision_total`
(the deprecated pd-profile-handler), each with its deprecated `llm_d_inference_scheduler_*`
twin, as llm-d-router registers them.
"""

from __future__ import annotations

import weakref
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from epp.scheduling.registry import PluginContext

DECODE_ONLY = "decode-only"
PREFILL_DECODE = "prefill-decode"
ENCODE_DECODE = "encode-decode"
ENCODE_PREFILL_DECODE = "encode-prefill-decode"
MAX_MODELS = 64  # model names come from clients: past this many, further ones count as "other"

_BY_REGISTRY: "weakref.WeakKeyDictionary[CollectorRegistry, DisaggMetrics]" = weakref.WeakKeyDictionary()


def decision_type(encode_used: bool, prefill_used: bool) -> str:
    if encode_used:
        return ENCODE_PREFILL_DECODE if prefill_used else ENCODE_DECODE
    return PREFILL_DECODE if prefill_used else DECODE_ONLY


class DisaggMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("plugin_name", "plugin_type", "model_name", "decision_type")
        old = ("model_name", "decision_type")
        self._counters = {
            "disagg": (
                Counter("llm_d_epp_disagg_decision_total", "Total number of disaggregation routing decisions made", labels, registry=registry),
                Counter("llm_d_inference_scheduler_disagg_decision_total",
                        "[Deprecated: Use llm_d_epp_disagg_decision_total] Total number of disaggregation routing decisions made", old, registry=registry),
            ),
            "pd": (
                Counter("llm_d_epp_pd_decision_total", "Total number of P/D disaggregation decisions made", labels, registry=registry),
                Counter("llm_d_inference_scheduler_pd_decision_total",
                        "[Deprecated: Use llm_d_epp_pd_decision_total] Total number of P/D disaggregation decisions made", old, registry=registry),
            ),
        }
        self._children: dict[tuple, tuple[Any, Any]] = {}
        self._models: set[str] = set()

    def record(self, kind: str, plugin_name: str, plugin_type: str, model: str, decision: str) -> None:
        """Count one decision; `kind` is "disagg" (disagg-profile-handler) or "pd" (pd-profile-handler)."""
        model = model or "unknown"
        if model not in self._models:
            if len(self._models) >= MAX_MODELS:
                model = "other"
            else:
                self._models.add(model)
        key = (kind, plugin_name, plugin_type, model, decision)
        pair = self._children.get(key)
        if pair is None:
            new, old = self._counters[kind]
            pair = self._children[key] = (new.labels(plugin_name, plugin_type, model, decision), old.labels(model, decision))
        pair[0].inc()
        pair[1].inc()


def disagg_metrics(ctx: PluginContext) -> DisaggMetrics:
    """The counters on the running EPP's registry (`metrics_registry` service), or on a private one."""
    registry = (ctx.services or {}).get("metrics_registry") or CollectorRegistry()
    m = _BY_REGISTRY.get(registry)
    if m is None:
        m = _BY_REGISTRY[registry] = DisaggMetrics(registry)
    return m
