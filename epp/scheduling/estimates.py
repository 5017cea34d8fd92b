"""Per-cycle estimates shared by several plugins (computed once per request, cached in CycleState)."""

from __future__ import annotations

from typing import Sequence

from epp.datastore.endpoint import Endpoint
from epp.scheduling.framework import CycleState, LLMRequest

ESTIMATES_KEY = "transfer-estimates"  # CycleState key shared with transfer-time-filter


def transfer_estimates(state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> dict[str, float]:
    """Estimated seconds per endpoint key (endpoints without a profile are absent); cached per cycle."""
    cached = state.read(ESTIMATES_KEY)
    if cached is None:
        cached = {}
        state.write(ESTIMATES_KEY, cached)
    for e in endpoints:
        if e.key not in cached:
            prof = e.metrics.transfer_profile
            if prof is not None:
                cached[e.key] = prof.seconds_for_tokens(request.prompt_tokens)
    return cached
