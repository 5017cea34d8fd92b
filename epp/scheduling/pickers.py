"""Pickers: choose the final endpoints from the weighted totals (GIE semantics)."""

from __future__ import annotations

import random
from typing import Any, Mapping, Sequence

from epp.datastore.endpoint import Endpoint
from epp.scheduling.framework import ConfigError, CycleState, LLMRequest, ScoredEndpoint
from epp.scheduling.registry import PluginContext, register


def _max_num(parameters: Mapping[str, Any]) -> int:
    n = parameters.get("maxNumOfEndpoints", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"maxNumOfEndpoints must be a positive integer, got {n!r}")
    return n


def _rng(ctx: PluginContext) -> random.Random:
    services = ctx.services or {}
    return services.get("rng") or random.Random()


class MaxScorePicker:
    """Highest total first; ties broken at random so equal endpoints share load."""

    type_name = "max-score-picker"

    def __init__(self, name: str, max_num: int, rng: random.Random) -> None:
        self.name, self.max_num, self.rng = name, max_num, rng

    def pick_totals(
        self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint], totals: Sequence[float]
    ) -> list[Endpoint]:
        """The hot path: same result as `pick`, on parallel lists."""
        if not endpoints:
            return []
        if self.max_num != 1:
            return self.pick(state, request, [ScoredEndpoint(e, t) for e, t in zip(endpoints, totals)])
        best = max(totals)
        if totals.count(best) == 1:
            return [endpoints[totals.index(best)]]
        return [endpoints[self.rng.choice([i for i, t in enumerate(totals) if t == best])]]

    def pick(self, state: CycleState, request: LLMRequest, scored: Sequence[ScoredEndpoint]) -> list[Endpoint]:
        if not scored:
            return []
        if self.max_num == 1:
            best = max(s.score for s in scored)
            top = [s.endpoint for s in scored if s.score == best]
            return [top[0] if len(top) == 1 else self.rng.choice(top)]
        shuffled = list(scored)
        self.rng.shuffle(shuffled)  # random order among equals survives the stable sort
        shuffled.sort(key=lambda s: s.score, reverse=True)
        return [s.endpoint for s in shuffled[: self.max_num]]


class RandomPicker:
    type_name = "random-picker"

    def __init__(self, name: str, max_num: int, rng: random.Random) -> None:
        self.name, self.max_num, self.rng = name, max_num, rng

    def pick(self, state: CycleState, request: LLMRequest, scored: Sequence[ScoredEndpoint]) -> list[Endpoint]:
        n = min(self.max_num, len(scored))
        return [s.endpoint for s in self.rng.sample(list(scored), n)]


class WeightedRandomPicker:
    """Picks with probability proportional to the total (A-Res sampling without replacement).

    When every total is zero it falls back to uniform choice, as GIE's picker does.
    """

    type_name = "weighted-random-picker"

    def __init__(self, name: str, max_num: int, rng: random.Random) -> None:
        self.name, self.max_num, self.rng = name, max_num, rng

    def pick(self, state: CycleState, request: LLMRequest, scored: Sequence[ScoredEndpoint]) -> list[Endpoint]:
        positive = [s for s in scored if s.score > 0]
        if not positive:
            return RandomPicker.pick(self, state, request, scored)  # type: ignore[arg-type]
        keyed = sorted(positive, key=lambda s: self.rng.random() ** (1.0 / s.score), reverse=True)
        return [s.endpoint for s in keyed[: self.max_num]]


class RoundRobinPicker:
    """Cycles through the candidates in key order: the Llumnix `rr` baseline."""

    type_name = "round-robin-picker"

    def __init__(self, name: str, max_num: int, rng: random.Random) -> None:
        self.name, self.max_num = name, max_num
        self._next = 0

    def pick(self, state: CycleState, request: LLMRequest, scored: Sequence[ScoredEndpoint]) -> list[Endpoint]:
        if not scored:
            return []
        ordered = sorted((s.endpoint for s in scored), key=lambda e: e.key)
        i = self._next % len(ordered)
        self._next += 1
        return (ordered[i:] + ordered[:i])[: self.max_num]


def _factory(cls):
    def make(name: str, parameters: Mapping[str, Any], ctx: PluginContext):
        return cls(name, _max_num(parameters), _rng(ctx))

    return make


register("max-score-picker")(_factory(MaxScorePicker))
register("random-picker")(_factory(RandomPicker))
register("weighted-random-picker")(_factory(WeightedRandomPicker))
register("round-robin-picker")(_factory(RoundRobinPicker))
