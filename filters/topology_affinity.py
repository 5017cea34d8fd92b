"""topology-affinity-filter (llm-d, alpha): keep candidates near the peer endpoint another stage picked.

In the prefill profile after the decode pick (or the reverse in prefill-first order), keeps the
candidates that share at least `minAffinity` (host, rack, zone or region; default host) with
the peer, by the topology labels (`topology-extractor`, default kubernetes.io/hostname and
topology.kubernetes.io/{rack,zone,region}). It fails open, as llm-d's does: no peer topology,
or no candidate close enough, keeps every candidate. A fixed notion of "near"; the measured
alternative is transfer-time-filter on per-link profiles.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from epp.datastore.endpoint import Endpoint
from epp.datastore.links import LEVELS, LinkProfiles
from epp.scheduling.estimates import links_of
from epp.scheduling.framework import PEER_ENDPOINT_KEY, ConfigError, CycleState, LLMRequest
from epp.scheduling.registry import PluginContext, register, reject_unknown


def has_topology(links: LinkProfiles, e: Endpoint) -> bool:
    return any(e.labels.get(label) for label in links.topology_labels.values())


class TopologyAffinityFilter:
    type_name = "topology-affinity-filter"

    def __init__(self, name: str, links: LinkProfiles, min_affinity: str) -> None:
        self.name, self.links = name, links
        self.max_rank = LEVELS.index(min_affinity)

    def filter(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        peer: Endpoint | None = state.read(PEER_ENDPOINT_KEY)
        if peer is None or not has_topology(self.links, peer):
            return list(endpoints)
        kept = [e for e in endpoints if LEVELS.index(self.links.level(peer, e)) <= self.max_rank]
        if not kept:
            state.notes[self.name] = {"kept_all": True, "reason": f"no candidate within {LEVELS[self.max_rank]} of {peer.key}"}
            return list(endpoints)
        return kept


@register("topology-affinity-filter", experimental=True)
def _factory(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> TopologyAffinityFilter:
    reject_unknown(name, parameters, ("minAffinity", "topologyProducerName"))
    level = parameters.get("minAffinity", "host")
    if level not in LEVELS[:-1]:
        raise ConfigError(f"plugin {name!r}: invalid topology level {level!r}, must be one of host, rack, zone, region")
    return TopologyAffinityFilter(name, links_of(ctx), level)
