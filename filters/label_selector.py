"""Label filters: a Kubernetes LabelSelector, and the P/D role filters of llm-d."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from epp.datastore.endpoint import DECODE_ROLES, ENCODE_ROLES, PREFILL_ROLES, ROLE_LABEL, Endpoint
from epp.scheduling.framework import ConfigError, CycleState, LLMRequest
from epp.scheduling.registry import PluginContext, register

_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: str
    values: frozenset[str]

    def matches(self, labels: Mapping[str, str]) -> bool:
        op = self.operator
        if op == "In":
            return labels.get(self.key) in self.values
        if op == "NotIn":
            return labels.get(self.key) not in self.values
        if op == "Exists":
            return self.key in labels
        return self.key not in labels


def parse_selector(parameters: Mapping[str, Any], where: str) -> list[Requirement]:
    """A metav1.LabelSelector (matchLabels AND matchExpressions) as a list of requirements."""
    reqs: list[Requirement] = []
    match_labels = parameters.get("matchLabels") or {}
    if not isinstance(match_labels, Mapping):
        raise ConfigError(f"{where}: matchLabels must be a map of label: value")
    for key, value in match_labels.items():
        reqs.append(Requirement(str(key), "In", frozenset({str(value)})))
    exprs = parameters.get("matchExpressions") or []
    if not isinstance(exprs, list):
        raise ConfigError(f"{where}: matchExpressions must be a list of {{key, operator, values}}")
    for i, expr in enumerate(exprs):
        if not isinstance(expr, Mapping) or "key" not in expr or "operator" not in expr:
            raise ConfigError(f"{where}: matchExpressions[{i}] needs 'key' and 'operator'")
        op = expr["operator"]
        if op not in _OPERATORS:
            raise ConfigError(f"{where}: matchExpressions[{i}].operator {op!r} is not one of {', '.join(_OPERATORS)}")
        values = expr.get("values") or []
        if op in ("In", "NotIn") and not values:
            raise ConfigError(f"{where}: matchExpressions[{i}] with operator {op} needs non-empty 'values'")
        if op in ("Exists", "DoesNotExist") and values:
            raise ConfigError(f"{where}: matchExpressions[{i}] with operator {op} must not have 'values'")
        reqs.append(Requirement(str(expr["key"]), op, frozenset(str(v) for v in values)))
    return reqs


class LabelSelectorFilter:
    """Keeps endpoints whose labels satisfy every requirement (an empty selector keeps all)."""

    type_name = "label-selector-filter"

    def __init__(self, name: str, requirements: list[Requirement]) -> None:
        self.name = name
        self.requirements = requirements

    def filter(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        reqs = self.requirements
        return [e for e in endpoints if all(r.matches(e.labels) for r in reqs)]


@register("label-selector-filter", aliases=("by-label-selector",))
def _label_selector(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> LabelSelectorFilter:
    params = parameters.get("selector", parameters)  # accept a nested `selector:` too
    return LabelSelectorFilter(name, parse_selector(params, f"plugin {name!r}"))


class RoleFilter:
    """Keeps endpoints whose `llm-d.ai/role` is one of `roles` (optionally unlabelled ones too)."""

    def __init__(self, type_name: str, name: str, roles: frozenset[str], keep_unlabelled: bool) -> None:
        self.type_name, self.name = type_name, name
        self.roles, self.keep_unlabelled = roles, keep_unlabelled

    def filter(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        out = []
        for e in endpoints:
            role = e.labels.get(ROLE_LABEL)
            if role in self.roles or (role is None and self.keep_unlabelled):
                out.append(e)
        return out


@register("decode-filter")
def _decode(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> RoleFilter:
    return RoleFilter("decode-filter", name, DECODE_ROLES, keep_unlabelled=True)


@register("prefill-filter")
def _prefill(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> RoleFilter:
    return RoleFilter("prefill-filter", name, PREFILL_ROLES, keep_unlabelled=False)


@register("encode-filter")
def _encode(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> RoleFilter:
    return RoleFilter("encode-filter", name, ENCODE_ROLES, keep_unlabelled=False)
