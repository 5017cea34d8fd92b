"""The shape of an EndpointPickerConfig, checked field by field so that every problem is reported at once.

A small declarative schema instead of a model library: the messages have to read like the Go
EPP's (unknown field → the accepted ones; a duration or quantity → the spelling it takes), and each
one carries the path that the loader turns into `file:line: field`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from epp.util.duration import parse_duration
from epp.util.quantity import parse_quantity

Path = tuple[Any, ...]
Report = Callable[[Path, str], None]


@dataclass(frozen=True)
class Spec:
    """One value's expected shape. `check` reports problems through `report` and returns nothing."""

    required: bool = field(default=False, kw_only=True)
    kind = "a value"  # what the value should be, in words (a class attribute)

    def check(self, value: Any, path: Path, report: Report) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Str(Spec):
    kind = "a string"

    def check(self, value: Any, path: Path, report: Report) -> None:
        if not isinstance(value, str):
            report(path, f"must be a string, got {_show(value)}")


@dataclass(frozen=True)
class Bool(Spec):
    kind = "true or false"

    def check(self, value: Any, path: Path, report: Report) -> None:
        if not isinstance(value, bool):
            report(path, f"must be true or false, got {_show(value)}")


@dataclass(frozen=True)
class Int(Spec):
    kind = "an integer"

    def check(self, value: Any, path: Path, report: Report) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            report(path, f"must be an integer, got {_show(value)}")


@dataclass(frozen=True)
class Number(Spec):
    kind = "a number"
    minimum: float | None = None

    def check(self, value: Any, path: Path, report: Report) -> None:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            report(path, f"must be a number, got {_show(value)}")
        elif self.minimum is not None and value < self.minimum:
            report(path, f"must be a number >= {self.minimum:g}, got {value!r}")


@dataclass(frozen=True)
class Duration(Spec):
    kind = "a Go duration"

    def check(self, value: Any, path: Path, report: Report) -> None:
        try:
            parse_duration(value)
        except (ValueError, TypeError) as e:
            report(path, str(e))


@dataclass(frozen=True)
class Quantity(Spec):
    kind = "a Kubernetes quantity"

    def check(self, value: Any, path: Path, report: Report) -> None:
        try:
            if parse_quantity(value) < 0:
                report(path, f"must not be negative, got {value!r}")
        except (ValueError, TypeError) as e:
            report(path, str(e))


@dataclass(frozen=True)
class AnyMap(Spec):
    """A map whose contents someone else checks (plugin parameters)."""

    kind = "a map"

    def check(self, value: Any, path: Path, report: Report) -> None:
        if not isinstance(value, Mapping):
            report(path, f"must be a map, got {_show(value)}")


@dataclass(frozen=True)
class List(Spec):
    item: Spec = field(default_factory=Str)
    nonempty: bool = False
    kind = "a list"

    def check(self, value: Any, path: Path, report: Report) -> None:
        if not isinstance(value, list):
            report(path, f"must be a list of {self.item.kind}, got {_show(value)}")
            return
        if self.nonempty and not value:
            report(path, f"must be a non-empty list of {self.item.kind}")
        for i, item in enumerate(value):
            self.item.check(item, path + (i,), report)


@dataclass(frozen=True)
class Obj(Spec):
    fields: Mapping[str, Spec] = field(default_factory=dict)
    kind = "a map"
    describe: str = ""  # e.g. "{pluginRef}", shown when the value is not a map

    def check(self, value: Any, path: Path, report: Report) -> None:
        if not isinstance(value, Mapping):
            report(path, f"must be a map{' ' + self.describe if self.describe else ''}, got {_show(value)}")
            return
        for key in value:
            if key not in self.fields:
                report(path + (key,), f"unknown field; expected one of {', '.join(self.fields)}")
        for key, spec in self.fields.items():
            if key in value:
                if value[key] is None and not spec.required:
                    continue  # `key:` with nothing after it means "unset", as in Go's decoder
                spec.check(value[key], path + (key,), report)
            elif spec.required:
                report(path + (key,), f"is required ({spec.kind})")


def _show(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, Mapping):
        return "a map"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# -- EndpointPickerConfig (llm-d.ai/v1alpha1, and GIE's inference.networking.x-k8s.io/v1alpha1) ------


def _ref(required: bool = False) -> Obj:
    return Obj({"pluginRef": Str(required=True)}, required=required, describe="{pluginRef: NAME}")


def _band(priority_required: bool) -> Obj:
    return Obj(
        {
            "priority": Int(required=priority_required),
            "maxBytes": Quantity(),
            "maxRequests": Quantity(),
            "fairnessPolicyRef": Str(),
            "orderingPolicyRef": Str(),
        },
        describe="{priority, maxBytes, maxRequests, fairnessPolicyRef, orderingPolicyRef}",
    )


_DATA_LAYER = Obj(
    {
        "injectDefaults": Bool(),
        "sources": List(Obj({"pluginRef": Str(required=True), "extractors": List(_ref())}, describe="{pluginRef, extractors}")),
        "discovery": _ref(),
        "peerDiscovery": _ref(),
        "crossReplicaSyncerPluginRef": Str(),
        "crossReplicaSyncInterval": Duration(),
    },
    describe="{injectDefaults, sources, discovery, …}",
)
# GIE v1.2–v1.4 spelled the saturation detector's thresholds inline; v1.5 and llm-d name a plugin.
_SATURATION_DETECTOR = Obj(
    {
        "pluginRef": Str(),
        "queueDepthThreshold": Int(),
        "kvCacheUtilThreshold": Number(),
        "metricsStalenessThreshold": Duration(),
    },
    describe="{pluginRef: NAME}",
)

CONFIG = Obj(
    {
        "apiVersion": Str(),
        "kind": Str(),
        "featureGates": List(Str()),
        "plugins": List(
            Obj({"name": Str(), "type": Str(required=True), "parameters": AnyMap()}, describe="{type, name, parameters}"),
            required=True,
            nonempty=True,
        ),
        "schedulingProfiles": List(
            Obj(
                {"name": Str(required=True), "plugins": List(Obj({"pluginRef": Str(required=True), "weight": Number(minimum=0)},
                                                                 describe="{pluginRef, weight}"))},
                describe="{name, plugins}",
            ),
            nonempty=True,
        ),
        "dataLayer": _DATA_LAYER,
        "data": _DATA_LAYER,  # GIE v1.3–v1.4 spelling of dataLayer
        "flowControl": Obj(
            {
                "maxBytes": Quantity(),
                "maxRequests": Quantity(),
                "defaultRequestTTL": Duration(),
                "noEndpointRequestTTL": Duration(),
                "defaultPriorityBand": _band(False),
                "defaultNegativePriorityBand": _band(False),
                "priorityBands": List(_band(True)),
                "usageLimitPolicyPluginRef": Str(),
                "saturationDetector": _SATURATION_DETECTOR,
                "enableEviction": Bool(),
            },
            describe="{maxBytes, maxRequests, defaultRequestTTL, priorityBands, …}",
        ),
        "requestHandler": Obj({"parsers": List(_ref())}, describe="{parsers: [{pluginRef}]}"),
        "saturationDetector": _SATURATION_DETECTOR,  # deprecated: flowControl.saturationDetector
        "parser": _ref(),  # deprecated: requestHandler.parsers
    },
    describe="with kind: EndpointPickerConfig",
)


def check_config(data: Any, report: Report) -> None:
    CONFIG.check(data, (), report)
