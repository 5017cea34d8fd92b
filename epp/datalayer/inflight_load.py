"""inflight-load-producer: requests and prompt tokens this EPP has sent to each endpoint and not seen finish.

llm-d's producer for `token-load-scorer`, `concurrency-detector` and `utilization-filter`'s
`active-requests`. A scheduled request adds, on the first endpoint of every profile result
(decode and prefill in P/D), one request and its prompt tokens less what that endpoint's prefix
cache is believed to hold (the named prefix producer's match, or the largest any prefix producer
reports); with `addEstimatedOutputTokens`, also `min(round(prompt × outputRatio), max_tokens,
maxEstimatedOutputTokens)` output tokens. Everything a request added is released once, when it
ends (success, error, cancel, timeout): this EPP sees no first-chunk event, so prompt tokens are
held until the response completes, where llm-d releases them at the first streamed chunk. Each
cycle also records, per endpoint, the uncached tokens this request would add, which
token-load-scorer counts in.

Consumers read a producer by name, llm-d's default being `inflight-load-producer`; a consumer
whose producer is not configured gets one created with default parameters, as llm-d's
default-producer registration does. One instance per name is shared through the config builder's
shared-object table, so a configured producer and the consumers that name it see the same counts.
"""


from __future__ import annotations

from typing import Any, Mapping, Sequence

from epp.datastore.endpoint import Endpoint
from epp.scheduling.attributes import IN_FLIGHT_KEY, PREFIX_MATCH_KEY, InFlightLoad, cached_tokens, get, put
from epp.scheduling.framework import ConfigError, CycleState, LLMRequest, SchedulingResult
from epp.scheduling.params import Params
from epp.scheduling.registry import PluginContext, register

TYPE = "inflight-load-producer"
UNCACHED_KEY = "UncachedRequestTokens"


class InFlightLoadProducer:
    type_name = TYPE
    produce_order = 20  # after the prefix producers, whose matches discount the prompt

    def __init__(self, name: str, *, add_output: bool = False, output_ratio: float = 1.5, max_output: int | None = None,
                 prefix_producer: str = "") -> None:
        self.name = name
        self.add_output = add_output
        self.output_ratio = output_ratio
        self.max_output = max_output
        self.prefix_producer = prefix_producer
        self.requests: dict[str, int] = {}
        self.tokens: dict[str, int] = {}
        self._held: dict[int, tuple[LLMRequest, list[tuple[str, int]]]] = {}  # id(request) -> (request, [(endpoint, tokens)])

    def uncached(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> dict[str, int]:
        if self.prefix_producer:
            infos = get(state, PREFIX_MATCH_KEY, self.prefix_producer) or {}
            cached = {k: v.cached_tokens for k, v in infos.items()}
        else:
            cached = cached_tokens(state)
        n = request.prompt_tokens
        return {e.key: max(0, n - cached.get(e.key, 0)) for e in endpoints}

    def produce(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> None:
        put(state, IN_FLIGHT_KEY, self.name, {e.key: InFlightLoad(self.requests.get(e.key, 0), self.tokens.get(e.key, 0)) for e in endpoints})
        put(state, UNCACHED_KEY, self.name, self.uncached(state, request, endpoints))

    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        if id(request) in self._held:
            return
        targets = {r.targets[0].key: r.targets[0] for r in result.profile_results.values() if r.targets}
        if not targets:
            return
        state = result.state or CycleState()
        uncached = (get(state, UNCACHED_KEY, self.name) or {})
        output = self.estimated_output(request)
        added = []
        for key, e in targets.items():
            n = uncached.get(key, request.prompt_tokens) + output
            self.requests[key] = self.requests.get(key, 0) + 1
            self.tokens[key] = self.tokens.get(key, 0) + n
            added.append((key, n))
        self._held[id(request)] = (request, added)  # holding the request keeps its id unique while tracked

    def estimated_output(self, request: LLMRequest) -> int:
        if not self.add_output:
            return 0
        n = round(request.prompt_tokens * self.output_ratio)
        if request.max_tokens is not None:
            n = min(n, request.max_tokens)
        if self.max_output is not None:
            n = min(n, self.max_output)
        return max(0, n)

    def response_complete(self, request: LLMRequest, result: SchedulingResult, outcome: str) -> None:
        held = self._held.pop(id(request), None)
        if held is None:
            return
        for key, n in held[1]:
            self._release(self.requests, key, 1)
            self._release(self.tokens, key, n)

    @staticmethod
    def _release(counts: dict[str, int], key: str, n: int) -> None:
        left = counts.get(key, 0) - n
        if left > 0:
            counts[key] = left
        else:
            counts.pop(key, None)

    def forget_endpoint(self, endpoint: Endpoint) -> None:
        self.requests.pop(endpoint.key, None)
        self.tokens.pop(endpoint.key, None)

    def in_flight(self) -> int:
        return len(self._held)

    def load(self, key: str) -> tuple[int, int]:
        """(requests, tokens) in flight to the endpoint with this key."""
        return self.requests.get(key, 0), self.tokens.get(key, 0)


def _shared(ctx: PluginContext) -> dict[str, Any]:
    shared = (ctx.services or {}).get("shared")
    if shared is None:
        raise ConfigError("internal: plugin context has no shared-object table")
    return shared


def inflight_load_producer(ctx: PluginContext, name: str = "") -> InFlightLoadProducer:
    """The producer a consumer reads: the configured one of that name, or a default one."""
    name = name or TYPE
    shared = _shared(ctx)
    key = f"{TYPE}/{name}"
    producer = shared.get(key)
    if producer is None:
        producer = shared[key] = InFlightLoadProducer(name)
        if ctx.datastore is not None:
            ctx.datastore.on_removal(producer.forget_endpoint)
    return producer


@register(TYPE)
def from_parameters(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> InFlightLoadProducer:
    p = Params(name, parameters, ("addEstimatedOutputTokens", "outputRatio", "maxEstimatedOutputTokens", "prefixMatchInfoProducerName",
                                  "syncCrossReplicaState"))
    p.bool("syncCrossReplicaState", True)  # only meaningful with a cross-replica syncer, which this EPP does not run
    # a consumer configured earlier may have created it: configure that instance
    producer = inflight_load_producer(ctx, name) if (ctx.services or {}).get("shared") is not None else InFlightLoadProducer(name)
    producer.add_output = p.bool("addEstimatedOutputTokens", False)
    producer.output_ratio = p.number("outputRatio", 1.5, lo=0.0)
    producer.max_output = p.int("maxEstimatedOutputTokens", 0, minimum=0) if p.has("maxEstimatedOutputTokens") else None
    producer.prefix_producer = p.str("prefixMatchInfoProducerName")
    return producer
