"""prefix-cache-scorer: prefer endpoints that already hold this request's prompt prefix (llm-d / GIE).

    score = matchLengthWeight × min(1, matchedTokens / matchLengthScaleTokens)²
          + (1 − matchLengthWeight) × matchBlocks / totalBlocks

from the `PrefixCacheMatchInfo` its producer left in the cycle: the approximate producer by
default (created when the config has none), or the one `prefixMatchInfoProducerName` names
(e.g. `precise-prefix-cache-producer`). No match data → 0. The square favours long matches,
whose saved prefill grows faster than linearly with length.

Configs written for GIE ≤ v1.4 / llm-d ≤ v0.7 put the hashing parameters (`blockSize`,
`hashBlockSize`, `blockSizeTokens`, `maxPrefixBlocksToMatch`, `lruCapacityPerServer`, `autoTune`,
…) on this scorer: they configure the producer it creates, so those configs load unchanged and
mean what they meant.

`precise-prefix-cache-scorer` (deprecated in llm-d) is the same scorer bound to a
`precise-prefix-cache-producer`: its parameters build that producer unless one is configured.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from epp.datastore.endpoint import Endpoint
from epp.scheduling.attributes import PREFIX_MATCH_KEY, get
from epp.scheduling.framework import ConfigError, CycleState, LLMRequest, ProducerWanted
from epp.scheduling.params import Params
from epp.scheduling.registry import PluginContext, register

APPROX = "approx-prefix-cache-producer"
PRECISE = "precise-prefix-cache-producer"
# producer parameters that older configs set on the scorer (hashBlockSize: GIE v1.0; mode: llm-d v0.2)
LEGACY = ("hashBlockSize", "blockSize", "blockSizeTokens", "autoTune", "maxPrefixBlocksToMatch", "maxPrefixTokensToMatch",
          "lruCapacityPerServer", "mode")


class PrefixCacheScorer:
    def __init__(self, type_name: str, name: str, *, producer_type: str = APPROX, producer_name: str = "",
                 producer_params: Mapping[str, Any] | None = None, match_length_weight: float = 0.0,
                 match_length_scale_tokens: int = 8192) -> None:
        self.type_name = type_name
        self.name = name
        self.producer_type = producer_type
        self.producer_name = producer_name
        self.producer_params = dict(producer_params or {}) or None
        self.weight = match_length_weight
        self.scale = match_length_scale_tokens
        self.producer = producer_name  # bound when the config is built

    def producer_wanted(self) -> ProducerWanted:
        return ProducerWanted(self.producer_type, self.producer_name or None, self.producer_params)

    def bind_producer(self, producer: Any) -> None:
        self.producer = producer.name

    def score(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        infos = get(state, PREFIX_MATCH_KEY, self.producer)
        if not infos:
            return [0.0] * len(endpoints)
        out = []
        w = self.weight
        for e in endpoints:
            info = infos.get(e.key)
            if info is None or info.total_blocks == 0:
                out.append(0.0)
                continue
            ratio = info.match_blocks / info.total_blocks
            length = min(1.0, info.cached_tokens / self.scale) ** 2 if w > 0 else 0.0
            out.append(w * length + (1.0 - w) * ratio)
        return out


@register("prefix-cache-scorer")
def _prefix(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> PrefixCacheScorer:
    mode = (parameters or {}).get("mode", "estimate")
    if mode != "estimate":  # llm-d ≤ v0.5 sim configs: the precise cache inside this scorer, tokenizing in the EPP
        raise ConfigError(f"plugin {name!r}: mode {mode!r} is llm-d's old in-scorer cache tracking; use precise-prefix-cache-producer "
                          f"(tokenProcessorConfig, kvEventsConfig) with prefixMatchInfoProducerName, and a token-producer")
    p = Params(name, parameters, ("prefixMatchInfoProducerName", "matchLengthWeight", "matchLengthScaleTokens", *LEGACY))
    weight = p.number("matchLengthWeight", 0.0, lo=0.0, hi=1.0)
    scale = p.int("matchLengthScaleTokens", 8192)
    if weight > 0 and scale <= 0:
        raise p.error("matchLengthScaleTokens", f"must be > 0 when matchLengthWeight is > 0, got {scale}")
    legacy = {k: v for k, v in p.values.items() if k in LEGACY}
    legacy.pop("mode", None)
    if "hashBlockSize" in legacy:  # GIE v1.0's name of blockSize
        legacy.setdefault("blockSize", legacy.pop("hashBlockSize"))
    producer = p.str("prefixMatchInfoProducerName")
    if producer and legacy:
        raise p.error(sorted(legacy)[0], f"is a parameter of the producer {producer!r}; set it there")
    return PrefixCacheScorer("prefix-cache-scorer", name, producer_name=producer, producer_params=legacy,
                             match_length_weight=weight, match_length_scale_tokens=max(scale, 1))


@register("precise-prefix-cache-scorer")
def _precise(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> PrefixCacheScorer:
    if not isinstance(parameters, Mapping):
        raise ConfigError(f"plugin {name!r}: parameters must be a map")
    return PrefixCacheScorer("precise-prefix-cache-scorer", name, producer_type=PRECISE, producer_params=parameters)
