"""inflight-load-producer: requests and estimated tokens in flight per endpoint, through this EPP.

Consumers (concurrency-detector, utilization-filter's `active-requests`) read it by producer
name, llm-d's default being `inflight-load-producer`; a consumer whose producer is not configured
gets one created with default parameters, as llm-d's default-producer registration does. Counts
rise at PreRequest (the first pick of every profile) and fall exactly once when the request ends.
Tokens are the prompt estimate, plus `outputRatio` × prompt (capped) when
`addEstimatedOutputTokens` is set; both are released at the end of the response.
"""

from __future__ import annotations

from typing import Any, Mapping

from epp.scheduling.framework import ConfigError, LLMRequest, SchedulingResult
from epp.scheduling.registry import PluginContext, register

TYPE = "inflight-load-producer"


class InFlightLoadProducer:
    type_name = TYPE

    def __init__(self, name: str, add_output: bool = False, output_ratio: float = 1.5, max_output: int | None = None) -> None:
        self.name = name
        self.add_output, self.output_ratio, self.max_output = add_output, output_ratio, max_output
        self.requests: dict[str, int] = {}
        self.tokens: dict[str, int] = {}
        self._held: dict[int, tuple[tuple[str, ...], int, LLMRequest]] = {}

    def estimate_tokens(self, request: LLMRequest) -> int:
        tokens = request.prompt_tokens
        if self.add_output:
            out = round(tokens * self.output_ratio)
            if request.max_tokens is not None:
                out = min(out, request.max_tokens)
            if self.max_output is not None:
                out = min(out, self.max_output)
            tokens += out
        return tokens

    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        if id(request) in self._held:
            return
        keys = tuple({r.targets[0].key: None for r in result.profile_results.values() if r.targets})
        tokens = self.estimate_tokens(request)
        self._held[id(request)] = (keys, tokens, request)
        for k in keys:
            self.requests[k] = self.requests.get(k, 0) + 1
            self.tokens[k] = self.tokens.get(k, 0) + tokens

    def response_complete(self, request: LLMRequest, result: SchedulingResult, outcome: str) -> None:
        held = self._held.pop(id(request), None)
        if held is None:
            return
        keys, tokens, _ = held
        for k in keys:
            self.requests[k] = max(0, self.requests.get(k, 0) - 1)
            self.tokens[k] = max(0, self.tokens.get(k, 0) - tokens)
            if not self.requests[k]:
                self.requests.pop(k, None)
                self.tokens.pop(k, None)

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
    return producer


@register(TYPE)
def _factory(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> InFlightLoadProducer:
    add = parameters.get("addEstimatedOutputTokens", False)
    ratio = parameters.get("outputRatio", 1.5)
    cap = parameters.get("maxEstimatedOutputTokens")
    if not isinstance(add, bool):
        raise ConfigError(f"plugin {name!r}: addEstimatedOutputTokens must be true or false, got {add!r}")
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or ratio < 0:
        raise ConfigError(f"plugin {name!r}: outputRatio must be a number >= 0, got {ratio!r}")
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 0):
        raise ConfigError(f"plugin {name!r}: maxEstimatedOutputTokens must be an integer >= 0, got {cap!r}")
    producer = inflight_load_producer(ctx, name)  # a consumer configured earlier may have created it
    producer.add_output, producer.output_ratio, producer.max_output = add, float(ratio), cap
    return producer
