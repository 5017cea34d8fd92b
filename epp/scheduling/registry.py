"""Plugin factories by type name.

Plugin packages register themselves with `@register("type-name", aliases=...)`. The framework
imports them through the `inference_epp.plugins` entry-point group (see pyproject.toml), so
`epp` never names a plugin module and third-party packages can add plugins the same way.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, Iterable, Mapping

from epp.scheduling.framework import ConfigError, Plugin, ProducerConsumer
from epp.util.duration import parse_duration

ENTRY_POINT_GROUP = "inference_epp.plugins"
# Plugin modules shipped with the project; used when the distribution is not installed
# (running from a source checkout) so entry points are missing.
BUILTIN_PLUGIN_MODULES = (
    "epp.scheduling.pickers",
    "epp.scheduling.profile_handlers",
    "epp.endpoint_health.plugin",
    "epp.requesthandling.parsers",
    "epp.datalayer.sources",
    "epp.datalayer.inflight_load",
    "epp.flowcontrol.saturation_detectors",
    "epp.flowcontrol.policies",
    "filters",
    "scorers",
    "disaggregation",
    "producers",
)


@dataclass(frozen=True, slots=True)
class PluginContext:
    """What a factory may use besides its parameters: shared services of the running EPP."""

    datastore: Any = None  # epp.datastore.Datastore
    services: Mapping[str, Any] | None = None  # named shared objects (e.g. "clock", "rng")


Factory = Callable[[str, Mapping[str, Any], PluginContext], Plugin]


@dataclass(frozen=True, slots=True)
class Registration:
    type_name: str
    factory: Factory
    deprecated_alias_of: str | None = None
    experimental: bool = False  # llm-d's "alpha": loads only with --allow-experimental-plugins


_REGISTRY: dict[str, Registration] = {}
_loaded = False


def register(type_name: str, *, aliases: tuple[str, ...] = (), experimental: bool = False) -> Callable[[Factory], Factory]:
    """Register a factory `(name, parameters, context) -> plugin` under `type_name` (and aliases)."""

    def deco(factory: Factory) -> Factory:
        _REGISTRY[type_name] = Registration(type_name, factory, experimental=experimental)
        for alias in aliases:
            _REGISTRY[alias] = Registration(alias, factory, deprecated_alias_of=type_name, experimental=experimental)
        return factory

    return deco


def load_plugins() -> None:
    """Import every plugin module once (entry points, then the built-in list as a fallback)."""
    global _loaded
    if _loaded:
        return
    seen: set[str] = set()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        seen.add(ep.value)
        ep.load()
    for mod in BUILTIN_PLUGIN_MODULES:
        if mod not in seen:
            importlib.import_module(mod)
    _loaded = True


def registered(type_name: str) -> Registration | None:
    load_plugins()
    return _REGISTRY.get(type_name)


def lookup(type_name: str) -> Registration:
    load_plugins()
    try:
        return _REGISTRY[type_name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ConfigError(f"unknown plugin type {type_name!r}; known types: {known}") from None


def known_types() -> list[str]:
    load_plugins()
    return sorted(_REGISTRY)


def create(type_name: str, name: str, parameters: Mapping[str, Any] | None, ctx: PluginContext) -> Plugin:
    reg = lookup(type_name)
    plugin = reg.factory(name, dict(parameters or {}), ctx)
    return plugin


def positive_duration(plugin: str, parameters: Mapping[str, Any], field: str, default: str | float) -> float:
    """A plugin's Go-duration parameter in seconds; a ConfigError naming the plugin and field otherwise."""
    try:
        seconds = parse_duration(parameters.get(field, default))
    except ValueError as e:
        raise ConfigError(f"plugin {plugin!r}: {field}: {e}") from None
    if seconds <= 0:
        raise ConfigError(f"plugin {plugin!r}: {field} must be positive, got {parameters.get(field)!r}")
    return seconds


def reject_unknown(plugin: str, parameters: Mapping[str, Any], known: Iterable[str], *, where: str = "") -> None:
    """A ConfigError naming every parameter the plugin does not have: nothing in a config is silently ignored.

    The one check every plugin uses (directly, through `Params`, or for nested maps with `where`
    as the dotted prefix); the loader's read-tracking is only a backstop for factories that skip it.
    """
    known = set(known)
    unknown = sorted(set(parameters) - known)
    if unknown:
        names = ", ".join(f"{where}{k}" for k in unknown)
        plural = "s" if len(unknown) > 1 else ""
        raise ConfigError(f"plugin {plugin!r}: {names}: unknown parameter{plural}; known: {', '.join(sorted(known)) or 'none'}")


def link_producers(instances: dict[str, Any], ctx: PluginContext) -> list[str]:
    """Bind every producer consumer to its producer, creating missing ones; returns the names created.

    Created producers join `instances` (named by their type, or `<consumer>-producer` when the
    consumer brought its own parameters), so the scheduler calls their hooks like any other.
    """
    created: list[str] = []
    bound: dict[str, Any] = {}

    def resolve(name: str, plugin: Any, seen: tuple[str, ...]) -> Any:
        if name in bound:
            return bound[name]
        if name in seen:
            raise ConfigError(f"plugin {name!r}: producer references form a cycle: {' -> '.join((*seen, name))}")
        want = plugin.producer_wanted()
        target = instances.get(want.name) if want.name else None
        if want.name and target is None and not want.name_optional:
            raise ConfigError(f"plugin {name!r}: no plugin named {want.name!r} to read data from; defined: {', '.join(sorted(instances))}")
        if target is not None and isinstance(target, ProducerConsumer):
            producer = resolve(want.name, target, (*seen, name))  # share that consumer's producer
        elif target is not None:
            if getattr(target, "type_name", None) not in _compatible(want.type):
                raise ConfigError(f"plugin {name!r}: {want.name!r} is a {getattr(target, 'type_name', '?')}, not a {want.type}")
            producer = target
        else:
            found = [p for p in instances.values() if getattr(p, "type_name", None) == want.type]
            if found and want.parameters:
                raise ConfigError(f"plugin {name!r}: its parameters {sorted(want.parameters)} belong to {found[0].name!r} "
                                  f"({want.type}); move them there")
            if found:
                producer = found[0]
            else:
                pname = f"{name}-producer" if want.parameters else want.type
                producer = create(want.type, pname, want.parameters, ctx)
                instances[pname] = producer
                created.append(pname)
        plugin.bind_producer(producer)
        bound[name] = producer
        return producer

    for name, plugin in list(instances.items()):
        if isinstance(plugin, ProducerConsumer):
            try:
                resolve(name, plugin, ())
            except ConfigError as e:
                e.plugin = name  # type: ignore[attr-defined]  # the config loader points at this plugin's line
                raise
    return created


def _compatible(producer_type: str) -> tuple[str, ...]:
    """A consumer of prefix matches may name any prefix-cache producer, as llm-d's data keys allow."""
    prefix = ("approx-prefix-cache-producer", "precise-prefix-cache-producer")
    return prefix if producer_type in prefix else (producer_type,)
