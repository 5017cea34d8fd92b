"""kv-backend-scorer: a soft preference by the endpoint's `llm-d.ai/kv-backend` label.

`weights` maps label values to scores in [0,1] (e.g. nvlink: 1.0, fs: 0.3); unknown or missing
values score `defaultScore`. Combined with load scorers this shifts traffic toward the faster
fabric without starving the other one, unlike a hard label filter.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from epp.datastore.endpoint import KV_BACKEND_LABEL, Endpoint
from epp.scheduling.framework import ConfigError, CycleState, LLMRequest
from epp.scheduling.registry import PluginContext, register

DEFAULT_WEIGHTS = {"nvlink": 1.0, "fs": 0.5}


class KVBackendScorer:
    type_name = "kv-backend-scorer"

    def __init__(self, name: str, weights: Mapping[str, float], default: float, label: str) -> None:
        self.name, self.weights, self.default, self.label = name, dict(weights), default, label

    def score(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        w, d, label = self.weights, self.default, self.label
        return [w.get(e.labels.get(label, ""), d) for e in endpoints]


def _unit(name: str, field: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"plugin {name!r}: {field} must be a number in [0, 1], got {value!r}")
    return float(value)


@register("kv-backend-scorer")
def _factory(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> KVBackendScorer:
    weights = parameters.get("weights", DEFAULT_WEIGHTS)
    if not isinstance(weights, Mapping) or not weights:
        raise ConfigError(f"plugin {name!r}: weights must be a map such as {{nvlink: 1.0, fs: 0.5}}")
    parsed = {str(k): _unit(name, f"weights.{k}", v) for k, v in weights.items()}
    default = _unit(name, "defaultScore", parameters.get("defaultScore", 0.0))
    return KVBackendScorer(name, parsed, default, str(parameters.get("labelKey", KV_BACKEND_LABEL)))
