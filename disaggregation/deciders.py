"""Deciders: per request, whether a disaggregation stage runs (llm-d's, and one that decides by cost).

A disagg profile handler asks its decider after the decode pick (decode-first order). llm-d's
deciders answer from token counts: `prefix-based-pd-decider` disaggregates when the prompt's
uncached part is long enough, `always-disagg-pd-decider` always does. `cost-based-pd-decider`
answers from the predicted latency of both options on the chosen decode pod: the best remote
prefill pair over the measured links against prefilling on the decode pod itself, including
what that prefill costs the decode batch already running there. Every answer carries its
reason, which the handler puts in the `Scoring decision` event.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

from epp.datastore.endpoint import Endpoint, can_prefill
from epp.observability.logging import get_logger
from epp.scheduling.estimates import cached_tokens
from epp.scheduling.framework import ConfigError, CycleState, LLMRequest, SchedulingResult
from epp.scheduling.pair_latency import NOTE_LIMIT, PairLatencyModel, best, pair_model_from
from epp.scheduling.registry import PluginContext, register, reject_unknown
from epp.util.duration import parse_duration

_log = get_logger("epp.disaggregation")


@dataclass(slots=True)
class Decision:
    disaggregate: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Decider(Protocol):
    type_name: str
    name: str

    def decide(self, state: CycleState, request: LLMRequest, decode: Endpoint | None) -> Decision:
        """Whether the stage runs for this request, given the decode pick (None in prefill-first order)."""
        ...


def _int(name: str, parameters: Mapping[str, Any], field_name: str) -> int:
    v = parameters.get(field_name, 0)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ConfigError(f"plugin {name!r}: {field_name} must be an integer, got {v!r}")
    if v < 0:
        raise ConfigError(f"plugin {name!r}: {field_name} cannot be negative, got {v}")
    return v


class PrefixBasedPDDecider:
    """llm-d's: disaggregate when the prompt's uncached part is at least `nonCachedTokens` (0 = never)."""

    type_name = "prefix-based-pd-decider"

    def __init__(self, name: str, non_cached_tokens: int, prompt_tokens: int) -> None:
        self.name, self.non_cached_tokens, self.prompt_tokens = name, non_cached_tokens, prompt_tokens

    def decide(self, state: CycleState, request: LLMRequest, decode: Endpoint | None) -> Decision:
        n, t = self.non_cached_tokens, request.prompt_tokens
        if n == 0:
            return Decision(False, "disabled (nonCachedTokens: 0)")
        if decode is None:
            return Decision(False, "no decode endpoint to compare the prefix cache with")
        if self.prompt_tokens and t < self.prompt_tokens:
            return Decision(False, f"prompt {t} tokens < promptTokens {self.prompt_tokens}")
        if t < n:
            return Decision(False, f"prompt {t} tokens < nonCachedTokens {n}")
        hit = cached_tokens(state, decode)
        details: dict[str, Any] = {"prompt_tokens": t, "cached_tokens": hit or 0}
        if hit is None:
            details["prefix_match"] = "no prefix-cache producer: prompt counted as uncached"
        uncached = t - (hit or 0)
        if uncached < n:
            return Decision(False, f"uncached {uncached} tokens < nonCachedTokens {n}", details)
        return Decision(True, f"uncached {uncached} tokens >= nonCachedTokens {n}", details)


class AlwaysDisaggPDDecider:
    type_name = "always-disagg-pd-decider"

    def __init__(self, name: str) -> None:
        self.name = name

    def decide(self, state: CycleState, request: LLMRequest, decode: Endpoint | None) -> Decision:
        return Decision(True, "always-disagg-pd-decider")


MULTIMODAL_BLOCKS = frozenset({"image_url", "video_url", "input_audio"})


class AlwaysDisaggMultimodalDecider:
    """llm-d's encode decider: run the encode stage when a chat message carries an image, video or audio block."""

    type_name = "always-disagg-multimodal-decider"

    def __init__(self, name: str) -> None:
        self.name = name

    def decide(self, state: CycleState, request: LLMRequest, decode: Endpoint | None) -> Decision:
        messages = (request.body or {}).get("messages") if isinstance(request.body, Mapping) else None
        for m in messages if isinstance(messages, list) else ():
            content = m.get("content") if isinstance(m, Mapping) else None
            for block in content if isinstance(content, list) else ():
                kind = block.get("type") if isinstance(block, Mapping) else None
                if kind in MULTIMODAL_BLOCKS:
                    return Decision(True, f"multimodal content ({kind})")
        return Decision(False, "text only")


class CostBasedPDDecider:
    """Disaggregate when the best remote-prefill pair is predicted cheaper than prefilling on the decode pod.

    Both costs come from the pair-latency model (the `pd-pair-latency-scorer` named by
    `pairScorer`, whose bookings and calibration it shares; or a model of its own built from
    the same parameters when the config has no such scorer).
    """

    type_name = "cost-based-pd-decider"

    def __init__(self, name: str, scorer_name: str | None, own_model: PairLatencyModel | None,
                 default_model: Callable[[], PairLatencyModel], min_gain: float, prompt_tokens: int) -> None:
        self.name = name
        self.scorer_name = scorer_name
        self.model = own_model
        self.owns_model = own_model is not None  # then it books requests itself
        self._default_model = default_model
        self.min_gain = min_gain
        self.prompt_tokens = prompt_tokens

    def bind_plugins(self, instances: Mapping[str, Any]) -> None:
        if self.owns_model:
            return
        models = {n: m for n, p in instances.items() if isinstance(m := getattr(p, "pair_model", None), PairLatencyModel)}
        if self.scorer_name is not None:
            if self.scorer_name not in models:
                raise ConfigError(f"plugin {self.name!r}: pairScorer {self.scorer_name!r} is not a configured pd-pair-latency-scorer"
                                  f" (configured: {', '.join(sorted(models)) or 'none'})")
            self.model = models[self.scorer_name]
        elif len(models) == 1:
            self.model = next(iter(models.values()))
        elif not models:
            self.model, self.owns_model = self._default_model(), True
        else:
            raise ConfigError(f"plugin {self.name!r}: several pd-pair-latency-scorers ({', '.join(sorted(models))}); "
                              "name the one to share with pairScorer")

    def decide(self, state: CycleState, request: LLMRequest, decode: Endpoint | None) -> Decision:
        model = self.model
        assert model is not None, "cost-based-pd-decider used before its config was bound"
        if decode is None:
            return Decision(False, "no decode endpoint to compare with (prefill-first order)")
        t = request.prompt_tokens
        if self.prompt_tokens and t < self.prompt_tokens:
            return Decision(False, f"prompt {t} tokens < promptTokens {self.prompt_tokens}")
        local = model.local(state, request, decode)
        prefills = [p for p in state.candidates if p is not decode and can_prefill(p)]
        pairs = model.pairs(state, request, decode, prefills)
        details: dict[str, Any] = {"local": local.summary()}
        if pairs:
            ranked = sorted(pairs, key=lambda e: e.cost)
            details["pairs"] = {e.prefill_on.key: e.summary() for e in ranked[:NOTE_LIMIT]}
        top = best(pairs)
        if top is None:
            why = "no prefill candidate" if not prefills else "no prefill candidate within maxTransferTime of this decode pod"
            return Decision(False, why, details)
        gain = local.cost - top.cost
        details["best_pair"] = top.prefill_on.key
        details["gain_ms"] = round(gain * 1000, 2)
        if gain > self.min_gain:
            return Decision(True, f"prefill on {top.prefill_on.key} is predicted {gain * 1000:.1f} ms cheaper than prefilling on {decode.key}", details)
        return Decision(False, f"prefilling on {decode.key} is predicted {-gain * 1000:.1f} ms cheaper than the best pair ({top.prefill_on.key})"
                        if gain < 0 else f"the best pair gains {gain * 1000:.1f} ms, not more than minGain", details)

    # -- lifecycle (only when the decider owns its model; else the scorer books) ------------------
    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        if self.owns_model and self.model is not None:
            self.model.book(request, result.stage_target("prefill"), result.targets[0])

    def response_complete(self, request: LLMRequest, result: SchedulingResult | None, outcome: str) -> None:
        if self.owns_model and self.model is not None:
            self.model.release(request, outcome)


@register("prefix-based-pd-decider")
def _prefix(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> PrefixBasedPDDecider:
    reject_unknown(name, parameters, ("nonCachedTokens", "promptTokens"))
    d = PrefixBasedPDDecider(name, _int(name, parameters, "nonCachedTokens"), _int(name, parameters, "promptTokens"))
    if d.non_cached_tokens == 0:
        _log.info("Prefix-based PD disabled (nonCachedTokens=0)", plugin=name)
    return d


@register("always-disagg-pd-decider")
def _always(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> AlwaysDisaggPDDecider:
    reject_unknown(name, parameters, ())
    return AlwaysDisaggPDDecider(name)


@register("always-disagg-multimodal-decider")
def _multimodal(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> AlwaysDisaggMultimodalDecider:
    reject_unknown(name, parameters, ())
    return AlwaysDisaggMultimodalDecider(name)


@register("cost-based-pd-decider")
def _cost(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> CostBasedPDDecider:
    decider_params = ("pairScorer", "minGain", "promptTokens")
    scorer = parameters.get("pairScorer")
    if scorer is not None and not isinstance(scorer, str):
        raise ConfigError(f"plugin {name!r}: pairScorer must be the name of a pd-pair-latency-scorer, got {scorer!r}")
    try:
        min_gain = parse_duration(parameters.get("minGain", 0))
    except ValueError as e:
        raise ConfigError(f"plugin {name!r}: minGain: {e}") from None
    model_params = {k: v for k, v in parameters.items() if k not in decider_params}
    if model_params and scorer is not None:
        raise ConfigError(f"plugin {name!r}: give latency parameters either here or on pairScorer {scorer!r}, not both")
    own_model = pair_model_from(name, model_params, ctx, decider_params) if model_params else None
    return CostBasedPDDecider(name, scorer, own_model, lambda: pair_model_from(name, {}, ctx), min_gain,
                              _int(name, parameters, "promptTokens"))
