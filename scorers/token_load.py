"""token-load-scorer: prefer endpoints with fewer prompt tokens in flight (GIE / llm-d).

    score = 1 − min(1, (inFlightTokens + this request's uncached tokens) / queueThresholdTokens)

from the `inflight-load-producer` it is bound to (created when the config has none). A finer
signal than request counts: one 30K-token prompt weighs what it costs. The default threshold
(4,194,304 = 128 requests of 32K tokens) suits large models; a small pool wants a smaller one.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from epp.datastore.endpoint import Endpoint
from epp.scheduling.attributes import IN_FLIGHT_KEY, get
from epp.scheduling.framework import CycleState, LLMRequest, ProducerWanted
from epp.scheduling.params import Params
from epp.scheduling.registry import PluginContext, register

PRODUCER = "inflight-load-producer"
UNCACHED_KEY = "UncachedRequestTokens"  # written by inflight-load-producer
DEFAULT_THRESHOLD = 4_194_304


class TokenLoadScorer:
    type_name = "token-load-scorer"

    def __init__(self, name: str, threshold: int = DEFAULT_THRESHOLD, producer_name: str = "") -> None:
        self.name = name
        self.threshold = float(threshold)
        self.producer_name = producer_name
        self.producer = producer_name

    def producer_wanted(self) -> ProducerWanted:
        return ProducerWanted(PRODUCER, self.producer_name or None)

    def bind_producer(self, producer: Any) -> None:
        self.producer = producer.name

    def score(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        load = get(state, IN_FLIGHT_KEY, self.producer) or {}
        uncached = get(state, UNCACHED_KEY, self.producer) or {}
        out = []
        for e in endpoints:
            info = load.get(e.key)
            tokens = (info.tokens if info is not None else 0) + uncached.get(e.key, 0)
            out.append(1.0 if tokens <= 0 else 1.0 - min(tokens, self.threshold) / self.threshold)
        return out


@register("token-load-scorer")
def _factory(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> TokenLoadScorer:
    p = Params(name, parameters, ("queueThresholdTokens", "inFlightLoadProducerName"))
    threshold = p.int("queueThresholdTokens", DEFAULT_THRESHOLD)
    return TokenLoadScorer(name, threshold if threshold > 0 else DEFAULT_THRESHOLD, p.str("inFlightLoadProducerName"))
