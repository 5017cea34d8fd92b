"""transfer-time-filter: the seed's `--gpu-p2p-max-transfer-time` guardrail.

Drops candidates whose estimated KV transfer time for this prompt exceeds `maxTransferTime`.
Candidates without a profile are kept (no data is not evidence of slowness). If the guardrail
would drop every candidate it keeps them all and says so in the decision log: a slow answer
beats no answer.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from epp.datastore.endpoint import Endpoint
from epp.scheduling.framework import CycleState, LLMRequest
from epp.scheduling.estimates import transfer_estimates
from epp.scheduling.registry import PluginContext, positive_duration, register


class TransferTimeFilter:
    type_name = "transfer-time-filter"
    needs_metrics = True

    def __init__(self, name: str, max_seconds: float) -> None:
        self.name, self.max_seconds = name, max_seconds

    def filter(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        est = transfer_estimates(state, request, endpoints)
        kept = [e for e in endpoints if est.get(e.key, 0.0) <= self.max_seconds]
        if not kept:
            state.notes[self.name] = {"kept_all": True, "reason": f"every candidate exceeds {self.max_seconds:g}s"}
            return list(endpoints)
        return kept


@register("transfer-time-filter")
def _factory(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> TransferTimeFilter:
    max_s = positive_duration(name, parameters, "maxTransferTime", "100ms")
    return TransferTimeFilter(name, max_s)
