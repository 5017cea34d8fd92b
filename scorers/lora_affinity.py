"""lora-affinity-scorer: send a LoRA request where its adapter is loaded, or can be (GIE / llm-d).

From the endpoint's `vllm:lora_requests_info` (the scraper keeps its newest series):
the target model is a running adapter → 1.0; running + waiting adapters < `max_lora` (a free
slot: loading costs one swap) → 0.8; the adapter is waiting to load → 0.6; otherwise → 0.
An endpoint that does not export the metric (or whose metrics are stale) has no free slot and
no adapter: 0, and it is named in the decision log.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

from epp.datastore.endpoint import Endpoint
from epp.scheduling.framework import CycleState, LLMRequest
from epp.scheduling.params import Params
from epp.scheduling.registry import PluginContext, register

DEFAULT_STALENESS = 2.0


class LoraAffinityScorer:
    type_name = "lora-affinity-scorer"
    needs_metrics = True

    def __init__(self, name: str, staleness: float = DEFAULT_STALENESS) -> None:
        self.name = name
        self.staleness = staleness

    def score(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        model = request.target_model
        now = time.monotonic()
        out, missing = [], []
        for e in endpoints:
            m = e.metrics
            if m.running_loras is None or m.age(now) > self.staleness:
                missing.append(e.key)
                out.append(0.0)
                continue
            waiting = m.waiting_loras or frozenset()
            if model in m.running_loras:
                out.append(1.0)
            elif len(m.running_loras) + len(waiting) < (m.max_loras or 0):
                out.append(0.8)
            elif model in waiting:
                out.append(0.6)
            else:
                out.append(0.0)
        if missing:
            state.notes[self.name] = {"no_lora_metrics": missing}
        return out


@register("lora-affinity-scorer")
def _factory(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> LoraAffinityScorer:
    Params(name, parameters, ())
    return LoraAffinityScorer(name, float((ctx.services or {}).get("metrics_staleness", DEFAULT_STALENESS)))
