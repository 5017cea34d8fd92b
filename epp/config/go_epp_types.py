"""Plugin types of the Go EPP (GIE v0.5–v1.5, llm-d inference scheduler / router v0.2–v0.10) that this EPP does not register.

When a config names one of these, the loader says it is a Go EPP plugin not implemented here and
points at the closest plugin that is, instead of just listing known types. Types registered here
(by this package or a plugin package) never reach this table, so it only has to be right about
what is missing. Sources: GIE `cmd/epp/runner/runner.go` per release, llm-d-router@ebab6879
`cmd/epp/runner/runner.go`, llm-d-inference-scheduler `pkg/plugins/register.go`.
"""

from __future__ import annotations

from dataclasses import dataclass

_PARSER = "requests in the OpenAI shape parse with openai-parser; anything else can pass through unparsed with passthrough-parser"
_NOT_HERE = "not implemented in this EPP"


@dataclass(frozen=True, slots=True)
class GoPlugin:
    origin: str  # where it is registered upstream
    kind: str
    closest: str | None = None  # the closest plugin type here
    note: str = ""
    alpha: bool = False  # needs --allow-experimental-plugins upstream


GO_EPP_PLUGINS: dict[str, GoPlugin] = {
    # -- scheduling: profile handlers and P/D -------------------------------------------------------
    "data-parallel-profile-handler": GoPlugin(
        "llm-d", "profile handler", "single-profile-handler",
        "data-parallel ranks are one endpoint per target port here (InferencePool targetPorts or --endpoint-target-ports)"),
    "header-profile-handler": GoPlugin("llm-d", "profile handler", None, alpha=True),
    "by-label": GoPlugin("llm-d, deprecated since v0.9", "filter", "label-selector-filter", "matchExpressions with operator In covers label + validValues"),
    # -- scheduling: scorers and filters --------------------------------------------------------------
    "session-affinity-scorer": GoPlugin("llm-d", "scorer", alpha=True),
    "session-affinity-filter": GoPlugin("llm-d", "filter", alpha=True),
    "session-id-producer": GoPlugin("llm-d", "data producer"),
    "context-length-aware": GoPlugin("llm-d", "filter/scorer", "transfer-time-filter", "drops endpoints by the estimated KV transfer time of this prompt"),
    "latency-scorer": GoPlugin("GIE v1.5, llm-d", "scorer", "predicted-latency-scorer", "predicts end-to-end latency per endpoint without a sidecar"),
    "predicted-latency-producer": GoPlugin("GIE v1.5, llm-d", "data producer", "predicted-latency-scorer", "the predictor is built into the scorer"),
    "prefix-cache-affinity-filter": GoPlugin("GIE v1.5, llm-d", "filter"),
    "slo-headroom-tier-filter": GoPlugin("GIE v1.5, llm-d", "filter", "predicted-latency-scorer"),
    "endpoint-attribute-filter": GoPlugin("llm-d", "filter", "label-selector-filter", alpha=True),
    "endpoint-attribute-scorer": GoPlugin("llm-d", "scorer", "kv-backend-scorer", "scores endpoints by a label value", alpha=True),
    "header-label-affinity-scorer": GoPlugin("llm-d", "scorer", "kv-backend-header-filter", "a request header choosing endpoints by label", alpha=True),
    "mm-embeddings-cache-scorer": GoPlugin("llm-d", "scorer"),
    "mm-embeddings-cache-producer": GoPlugin("llm-d", "data producer"),
    "burst-prefix-cache-producer": GoPlugin("llm-d", "data producer", alpha=True),
    "p2p-source-producer": GoPlugin("llm-d", "data producer", alpha=True),
    "agent-identity": GoPlugin("llm-d", "request control", alpha=True),
    "disaggregatedset-rollout-screener": GoPlugin("llm-d", "screener", alpha=True),
    "disaggregatedset-rollout-pod-extractor": GoPlugin("llm-d", "data extractor", alpha=True),
    "request-attribute-reporter": GoPlugin("GIE v1.4+, llm-d", "request control"),
    "latency-slo-admitter": GoPlugin("GIE v1.5, llm-d", "admitter", "utilization-detector",
                                     "sheddable requests (negative InferenceObjective priority) get 429 when the pool is saturated"),
    "probabilistic-admitter": GoPlugin("llm-d", "admitter", "utilization-detector",
                                       "sheddable requests (negative InferenceObjective priority) get 429 when the pool is saturated"),
    "header-based-testing-filter": GoPlugin("GIE, conformance tests only", "filter", None,
                                            "it lets a client header choose endpoints, which this EPP never allows"),
    "destination-endpoint-served-verifier": GoPlugin("GIE, conformance tests only", "response hook", None,
                                                     "conformance-test plugin; the served endpoint is logged in the decision log instead"),
    # -- request handling ---------------------------------------------------------------------------------
    "anthropic-parser": GoPlugin("llm-d", "parser", "openai-parser", _PARSER),
    "vllmhttp-parser": GoPlugin("llm-d", "parser", "openai-parser", _PARSER),
    "vllmgrpc-parser": GoPlugin("GIE v1.5, llm-d", "parser", "passthrough-parser", _PARSER),
    "sglanghttp-parser": GoPlugin("llm-d", "parser", "openai-parser", _PARSER),
    "vertexai-parser": GoPlugin("llm-d", "parser", "passthrough-parser", _PARSER),
    # -- data layer -----------------------------------------------------------------------------------------
    "k8s-notification-source": GoPlugin("GIE v1.4+, llm-d", "data source"),
    "endpoint-notification-source": GoPlugin("GIE v1.5, llm-d", "data source"),
    "models-data-source": GoPlugin("llm-d", "data source"),
    "models-data-extractor": GoPlugin("llm-d", "data extractor"),
    "model-server-protocol-models": GoPlugin("llm-d", "data extractor"),
    "dcgm-data-source": GoPlugin("llm-d", "data source", alpha=True),
    "dcgm-extractor": GoPlugin("llm-d", "data extractor", alpha=True),
    "multicluster-metrics-data-source": GoPlugin("llm-d", "data source", alpha=True),
    "multicluster-metrics-extractor": GoPlugin("llm-d", "data extractor", alpha=True),
    "multicluster-file-discovery": GoPlugin("llm-d", "endpoint discovery", "file-discovery", alpha=True),
    "multicluster-queue-scorer": GoPlugin("llm-d", "scorer", "queue-scorer", alpha=True),
    "multicluster-kv-cache-utilization-scorer": GoPlugin("llm-d", "scorer", "kv-cache-utilization-scorer", alpha=True),
    "multicluster-prefix-cache-scorer": GoPlugin("llm-d", "scorer", alpha=True),
    "multicluster-approx-prefix-cache-producer": GoPlugin("llm-d", "data producer", alpha=True),
    "multicluster-session-affinity-filter": GoPlugin("llm-d", "filter", alpha=True),
    "cross-replica-publisher": GoPlugin("llm-d", "cross-replica syncer", None, "replicas here are active-passive (--ha-enable-leader-election)"),
    "local-syncer": GoPlugin("llm-d", "cross-replica syncer", None, "replicas here are active-passive (--ha-enable-leader-election)"),
    # -- flow control -------------------------------------------------------------------------------------
    "edf-ordering-policy": GoPlugin("GIE v1.4+, llm-d", "ordering policy", "fcfs-ordering-policy"),
    "slo-deadline-ordering-policy": GoPlugin("GIE v1.4+, llm-d", "ordering policy", "fcfs-ordering-policy"),
    "program-aware-fairness": GoPlugin("llm-d", "fairness policy", "round-robin-fairness-policy"),
    "priority-holdback-policy": GoPlugin("llm-d", "usage limit policy", "static-usage-limit-policy", alpha=True),
    "soft-reflective-ceiling-policy": GoPlugin("llm-d", "usage limit policy", "static-usage-limit-policy", alpha=True),
    "eviction-sheddable-filter": GoPlugin("GIE v1.5", "eviction policy", None, "in-flight eviction (flowControl.enableEviction) is not implemented"),
    "eviction-priority-then-time-ordering": GoPlugin("GIE v1.5", "eviction policy", None, "in-flight eviction (flowControl.enableEviction) is not implemented"),
    "sheddable-eviction-filter": GoPlugin("llm-d", "eviction policy", None, "in-flight eviction (flowControl.enableEviction) is not implemented", alpha=True),
    "priority-then-time-eviction-order-policy": GoPlugin("llm-d", "eviction policy", None, "in-flight eviction (flowControl.enableEviction) is not implemented", alpha=True),
}


def explain_unknown(type_name: str, known: list[str]) -> str:
    """The message for a type nobody registered: a Go EPP plugin (and what to use), or a typo."""
    go = GO_EPP_PLUGINS.get(type_name)
    if go is not None:
        msg = f"plugin type {type_name!r} is a Go EPP {go.kind} plugin ({go.origin}) that is {_NOT_HERE}"
        if go.closest:
            msg += f"; the closest plugin here is {go.closest!r}"
        if go.note:
            msg += f" ({go.note})"
        return msg
    import difflib

    close = difflib.get_close_matches(type_name, known + list(GO_EPP_PLUGINS), n=3, cutoff=0.75)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown plugin type {type_name!r}{hint} known types: {', '.join(known)}"
