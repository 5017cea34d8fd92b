"""transfer-time-filter: the seed's `--gpu-p2p-max-transfer-time` guardrail, per endpoint or per P/D link.

Drops candidates whose estimated KV transfer time for this prompt exceeds `maxTransferTime`.
Candidates without a profile are kept (no data is not evidence of slowness).

* Single endpoints (P/D proxies): the estimate is the endpoint's own profile. If the guardrail
  would drop every candidate it keeps them all and says so in the decision log: a slow answer
  beats no answer.
* Under a disagg profile handler, once the other stage has picked (the peer endpoint), the
  estimate is the link between each candidate and that peer (`epp.datastore.links`). In the
  prefill stage every link may be dropped: the prefill profile then picks nothing and the
  request is served decode-only, prefilling where it decodes — the pair is refused, the request
  is not. In a decode stage (prefill-first order) dropping all keeps all, as above.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from epp.datastore.endpoint import Endpoint
from epp.datastore.links import LinkProfiles
from epp.scheduling.estimates import link_transfer, links_of, transfer_estimates
from epp.scheduling.framework import PEER_ENDPOINT_KEY, STAGE_KEY, CycleState, LLMRequest
from epp.scheduling.registry import PluginContext, positive_duration, register


class TransferTimeFilter:
    type_name = "transfer-time-filter"
    needs_metrics = True

    def __init__(self, name: str, max_seconds: float, links: LinkProfiles | None = None) -> None:
        self.name, self.max_seconds = name, max_seconds
        self.links = links or LinkProfiles()

    def filter(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        peer: Endpoint | None = state.read(PEER_ENDPOINT_KEY)
        stage = state.read(STAGE_KEY)
        if peer is not None and stage in ("prefill", "decode"):
            return self._links(state, request, endpoints, peer, stage)
        est = transfer_estimates(state, request, endpoints)
        kept = [e for e in endpoints if est.get(e.key, 0.0) <= self.max_seconds]
        if not kept:
            state.notes[self.name] = {"kept_all": True, "reason": f"every candidate exceeds {self.max_seconds:g}s"}
            return list(endpoints)
        return kept

    def _links(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint], peer: Endpoint, stage: str) -> list[Endpoint]:
        kept, over = [], {}
        for e in endpoints:
            p, d = (e, peer) if stage == "prefill" else (peer, e)
            seconds, _ = link_transfer(state, self.links, request.prompt_tokens, p, d) if p is not d else (0.0, "")
            if seconds is not None and seconds > self.max_seconds:
                over[e.key] = round(seconds * 1000, 2)
            else:
                kept.append(e)
        if over:
            state.notes[self.name] = {"over_max_ms": over, "peer": peer.key}
        if not kept and stage == "decode":
            state.notes[self.name]["kept_all"] = True
            return list(endpoints)
        return kept


@register("transfer-time-filter")
def _factory(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> TransferTimeFilter:
    max_s = positive_duration(name, parameters, "maxTransferTime", "100ms")
    return TransferTimeFilter(name, max_s, links_of(ctx))
