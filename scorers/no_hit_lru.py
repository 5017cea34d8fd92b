"""no-hit-lru-scorer: spread requests that hit no cache over the endpoints least recently given one (llm-d).

A request is cold when no candidate holds any of its prefix (per the prefix producer it reads).
Cold: with N candidates, endpoints never given a cold request come first, in candidate order,
scoring 1 − i/(N−1); then the others by how long ago they last got one, oldest first, scoring
1 − (never-used count + LRU position)/(N−1), floored at 0; one candidate scores 1. Warm: 0.5
everywhere, so cache affinity decides. A cold request's primary endpoint (and the `prefill`
profile's) becomes most recent. New prefixes thus seed caches evenly instead of piling onto
whichever endpoint load scorers like best at that instant.

`prefixMatchInfoProducerName` names the producer; `prefixPluginName` (llm-d: "never used")
here shares the producer of the prefix scorer it names, which is what its README promises.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping, Sequence

from epp.datastore.endpoint import Endpoint
from epp.scheduling.attributes import PREFIX_MATCH_KEY, get
from epp.scheduling.framework import CycleState, LLMRequest, ProducerWanted, SchedulingResult
from epp.scheduling.params import Params
from epp.scheduling.registry import PluginContext, register

PREFILL_PROFILE = "prefill"


class NoHitLRUScorer:
    type_name = "no-hit-lru-scorer"

    def __init__(self, name: str, lru_size: int = 1024, producer_name: str = "", prefix_plugin: str = "prefix-cache-scorer",
                 prefix_plugin_given: bool = False) -> None:
        self.name = name
        self.lru_size = lru_size
        self.producer_name = producer_name
        self.prefix_plugin = prefix_plugin
        self.prefix_plugin_given = prefix_plugin_given
        self.producer = producer_name
        self.lru: OrderedDict[str, None] = OrderedDict()  # oldest first
        self.cold_key = f"{name}/cold"

    def producer_wanted(self) -> ProducerWanted:
        if self.producer_name:
            return ProducerWanted("approx-prefix-cache-producer", self.producer_name)
        return ProducerWanted("approx-prefix-cache-producer", self.prefix_plugin, name_optional=not self.prefix_plugin_given)

    def bind_producer(self, producer: Any) -> None:
        self.producer = producer.name

    def score(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        infos = get(state, PREFIX_MATCH_KEY, self.producer) or {}
        cold = not any(infos.get(e.key) is not None and infos[e.key].match_blocks > 0 for e in endpoints)
        state.write(self.cold_key, cold)
        n = len(endpoints)
        if not cold:
            return [0.5] * n
        if n == 1:
            return [1.0]
        position = {k: i for i, k in enumerate(self.lru)}
        never = [e for e in endpoints if e.key not in position]
        rank_of_never = {id(e): i for i, e in enumerate(never)}
        out = []
        for e in endpoints:
            rank = rank_of_never[id(e)] if id(e) in rank_of_never else len(never) + position[e.key]
            out.append(max(0.0, 1.0 - rank / (n - 1)))
        return out

    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        if result.state is None or not result.state.read(self.cold_key):
            return
        for profile in (result.primary_profile, PREFILL_PROFILE):
            run = result.profile_results.get(profile)
            if run is not None and run.targets:
                key = run.targets[0].key
                self.lru.pop(key, None)
                self.lru[key] = None
                if len(self.lru) > self.lru_size:
                    self.lru.popitem(last=False)

    def forget_endpoint(self, endpoint: Endpoint) -> None:
        self.lru.pop(endpoint.key, None)


@register("no-hit-lru-scorer")
def _factory(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> NoHitLRUScorer:
    p = Params(name, parameters, ("prefixPluginType", "prefixPluginName", "lruSize", "prefixMatchInfoProducerName"))
    p.str("prefixPluginType", "prefix-cache-scorer")
    size = p.int("lruSize", 1024)
    scorer = NoHitLRUScorer(name, size if size > 0 else 1024, p.str("prefixMatchInfoProducerName"),
                            p.str("prefixPluginName", "prefix-cache-scorer") or "prefix-cache-scorer", p.has("prefixPluginName"))
    if ctx.datastore is not None:
        ctx.datastore.on_removal(scorer.forget_endpoint)
    return scorer
