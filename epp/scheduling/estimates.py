"""Per-cycle estimates shared by several plugins (computed once per request, cached in CycleState)."""

from __future__ import annotations

from typing import Sequence

from epp.datastore.endpoint import Endpoint
from epp.datastore.links import LinkProfiles
from epp.scheduling import attributes
from epp.scheduling.attributes import PREFIX_MATCH_KEY
from epp.scheduling.framework import CycleState, LLMRequest
from epp.scheduling.registry import PluginContext

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


LINK_ESTIMATES_KEY = "link-transfer-estimates"  # CycleState: (prefill key, decode key) -> (seconds | None, source)


def link_transfer(state: CycleState, links: LinkProfiles, tokens: int, prefill: Endpoint, decode: Endpoint) -> tuple[float | None, str]:
    """Estimated KV-transfer seconds of `tokens` over the link prefill → decode, and the profile's source; cached per cycle."""
    cache = state.read(LINK_ESTIMATES_KEY)
    if cache is None:
        cache = {}
        state.write(LINK_ESTIMATES_KEY, cache)
    k = (prefill.key, decode.key, tokens)
    hit = cache.get(k)
    if hit is None:
        hit = cache[k] = links.transfer_seconds(prefill, decode, tokens)
    return hit


def cached_tokens(state: CycleState, endpoint: Endpoint) -> int | None:
    """Prompt tokens a prefix producer found cached on `endpoint` this cycle; None when no producer ran."""
    if state.read(PREFIX_MATCH_KEY) is None:
        return None
    return attributes.cached_tokens(state).get(endpoint.key, 0)


def links_of(ctx: PluginContext) -> LinkProfiles:
    """The running EPP's link profiles (a private, empty table when there is no datastore)."""
    return ctx.datastore.links if ctx.datastore is not None else LinkProfiles()
