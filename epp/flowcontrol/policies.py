"""Flow-control policies with llm-d's type names: FCFS ordering, strict and round-robin fairness, static usage limit."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from epp.flowcontrol.types import FlowView
from epp.scheduling.framework import ConfigError
from epp.scheduling.registry import PluginContext, register


class FCFSOrderingPolicy:
    """Requests of a flow leave in the order they arrived."""

    type_name = "fcfs-ordering-policy"
    fifo = True

    def __init__(self, name: str) -> None:
        self.name = name


class GlobalStrictFairnessPolicy:
    """The flow whose head request is oldest goes next: FCFS across every flow of the band."""

    type_name = "global-strict-fairness-policy"

    def __init__(self, name: str) -> None:
        self.name = name

    def pick_flow(self, flows: Sequence[FlowView]) -> int:
        best, best_t = 0, float("inf")
        for i, f in enumerate(flows):
            t = f.head_enqueued_at()
            if t < best_t:
                best, best_t = i, t
        return best


class RoundRobinFairnessPolicy:
    """Flows take turns, one request each, in the order they first queued."""

    type_name = "round-robin-fairness-policy"

    def __init__(self, name: str) -> None:
        self.name = name
        self._last = ""

    def pick_flow(self, flows: Sequence[FlowView]) -> int:
        ids = [f.fairness_id for f in flows]
        nxt = 0
        if self._last in ids:
            nxt = (ids.index(self._last) + 1) % len(ids)
        else:
            later = [i for i, fid in enumerate(ids) if fid > self._last]
            nxt = later[0] if later else 0
        self._last = ids[nxt]
        return nxt


class StaticUsageLimitPolicy:
    """Every band may dispatch while pool saturation is below `threshold` (1.0: until saturated)."""

    type_name = "static-usage-limit-policy"

    def __init__(self, name: str, threshold: float = 1.0) -> None:
        self.name, self.threshold = name, threshold

    def limit(self, priority: int) -> float:
        return self.threshold


@register("fcfs-ordering-policy")
def _fcfs(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> FCFSOrderingPolicy:
    return FCFSOrderingPolicy(name)


@register("global-strict-fairness-policy")
def _strict(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> GlobalStrictFairnessPolicy:
    return GlobalStrictFairnessPolicy(name)


@register("round-robin-fairness-policy")
def _round_robin(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> RoundRobinFairnessPolicy:
    return RoundRobinFairnessPolicy(name)


@register("static-usage-limit-policy")
def _static(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> StaticUsageLimitPolicy:
    threshold = parameters.get("threshold", 1.0)
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or threshold <= 0:
        raise ConfigError(f"plugin {name!r}: threshold must be a number > 0, got {threshold!r}")
    return StaticUsageLimitPolicy(name, float(threshold))
