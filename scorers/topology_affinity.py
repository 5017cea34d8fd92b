"""topology-affinity-scorer (llm-d, alpha): llm-d's fixed proximity curve to the peer endpoint.

Each candidate scores by the tightest topology level it shares with the endpoint the other
stage picked: host 1.0, rack 0.2, zone 0.05, region 0.02, none 0 — hardcoded, as upstream. No
peer topology, or a candidate without topology labels, scores 0. It stands for the fixed-curve
baseline; pd-pair-latency-scorer scores the same choice on measured link profiles.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from epp.datastore.endpoint import Endpoint
from epp.datastore.links import LinkProfiles
from epp.scheduling.estimates import links_of
from epp.scheduling.framework import PEER_ENDPOINT_KEY, CycleState, LLMRequest
from epp.scheduling.registry import PluginContext, register, reject_unknown

LEVEL_SCORES = {"host": 1.0, "rack": 0.2, "zone": 0.05, "region": 0.02, "none": 0.0}


class TopologyAffinityScorer:
    type_name = "topology-affinity-scorer"

    def __init__(self, name: str, links: LinkProfiles) -> None:
        self.name, self.links = name, links

    def score(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        peer: Endpoint | None = state.read(PEER_ENDPOINT_KEY)
        if peer is None:
            return [0.0] * len(endpoints)
        return [LEVEL_SCORES[self.links.level(peer, e)] for e in endpoints]


@register("topology-affinity-scorer", experimental=True)
def _factory(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> TopologyAffinityScorer:
    reject_unknown(name, parameters, ("topologyProducerName",))
    return TopologyAffinityScorer(name, links_of(ctx))
