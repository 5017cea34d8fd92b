"""transfer-bandwidth-scorer: prefer the endpoint that moves this request's KV cache fastest.

Per candidate, the KV transfer time of this prompt is estimated from the endpoint's measured
profile (prompt tokens → blocks → interpolated seconds, the Llumnix method). The score falls
with the *absolute* time an endpoint loses against the fastest one for this prompt:

    score(e) = 1 / (1 + (estimate(e) − fastest) / timeScale)

so the fastest scores 1 and one that costs `timeScale` (default 100ms) more scores 0.5. Time,
not the ratio of speeds, is what a client waits for: a 3 ms vs 12 ms transfer of a short prompt
is 4× slower yet costs nothing worth routing for, while 40 ms vs 400 ms for a long prompt is
decisive. So short prompts are left to the load scorers and long ones go to the fast fabric.
An endpoint without a profile scores `noProfileScore` (neutral, default 0.5) and is named in
the decision log.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from epp.datastore.endpoint import Endpoint
from epp.scheduling.framework import ConfigError, CycleState, LLMRequest
from epp.scheduling.estimates import transfer_estimates
from epp.scheduling.registry import PluginContext, positive_duration, register


class TransferBandwidthScorer:
    type_name = "transfer-bandwidth-scorer"
    needs_metrics = True

    def __init__(self, name: str, no_profile_score: float, time_scale: float = 0.1) -> None:
        self.name, self.no_profile_score, self.time_scale = name, no_profile_score, time_scale

    def score(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        est = transfer_estimates(state, request, endpoints)
        known = [est[e.key] for e in endpoints if e.key in est]
        fastest = min(known) if known else 0.0
        missing = [e.key for e in endpoints if e.key not in est]
        state.notes[self.name] = {"estimate_ms": {k: round(v * 1000, 3) for k, v in est.items() if any(e.key == k for e in endpoints)}}
        if missing:
            state.notes[self.name]["no_profile"] = missing
        out = []
        for e in endpoints:
            s = est.get(e.key)
            out.append(self.no_profile_score if s is None else 1.0 / (1.0 + max(0.0, s - fastest) / self.time_scale))
        return out


@register("transfer-bandwidth-scorer")
def _factory(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> TransferBandwidthScorer:
    v = parameters.get("noProfileScore", 0.5)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1:
        raise ConfigError(f"plugin {name!r}: noProfileScore must be a number in [0, 1], got {v!r}")
    return TransferBandwidthScorer(name, float(v), positive_duration(name, parameters, "timeScale", "100ms"))
