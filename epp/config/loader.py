"""EndpointPickerConfig: load, validate (errors name file, line and field), build the scheduler.

Accepts the Go EPP's format unchanged:

    apiVersion: inference.networking.x-k8s.io/v1alpha1
    kind: EndpointPickerConfig
    plugins: [{name, type, parameters}]
    schedulingProfiles: [{name, plugins: [{pluginRef, weight}]}]

with GIE's defaulting: no profile handler → single-profile-handler; a profile without a picker
→ max-score-picker; no schedulingProfiles → one `default` profile referencing every plugin.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from epp.scheduling import registry
from epp.scheduling.framework import (
    ConfigError,
    Filter,
    Picker,
    ProfileHandler,
    SchedulerProfile,
    Scorer,
    WeightedScorer,
)
from epp.scheduling.registry import PluginContext
from epp.scheduling.scheduler import Observer, Scheduler

API_VERSIONS = ("inference.networking.x-k8s.io/v1alpha1", "inference.networking.k8s.io/v1alpha1")
KIND = "EndpointPickerConfig"
PROFILES_DIR = Path(__file__).resolve().parent.parent.parent / "profiles"
PROFILE_ENV = "EPP_CONFIG_PROFILE"
DEFAULT_PROFILE = "default"


@dataclass(slots=True)
class LoadedConfig:
    """The config text and where it came from (shown in errors and at startup)."""

    source: str  # a file path, "<config-text>" or "profile NAME (path)"
    text: str
    profile: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    lines: dict[tuple, int] = field(default_factory=dict)

    def line_of(self, *path: Any) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), None)

    def error(self, path: tuple, message: str) -> ConfigError:
        line = self.line_of(*path)
        where = f"{self.source}:{line}" if line else self.source
        dotted = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in path).replace(".[", "[")
        return ConfigError(f"{where}: {dotted or 'config'}: {message}")


# -- finding the config -------------------------------------------------------------------------


def profiles_dir() -> Path:
    return Path(os.environ.get("EPP_PROFILES_DIR", PROFILES_DIR))


def list_profiles() -> list[str]:
    return sorted(p.stem for p in profiles_dir().glob("*.yaml"))


def profile_path(name: str) -> Path:
    path = profiles_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown config profile {name!r}; available: {', '.join(list_profiles()) or 'none'}")
    return path


def resolve_config(
    config_file: str | None = None, config_text: str | None = None, profile: str | None = None
) -> LoadedConfig:
    """Exactly one source wins: --config-text, --config-file, --config-profile/EPP_CONFIG_PROFILE, `default`."""
    given = [n for n, v in (("--config-file", config_file), ("--config-text", config_text), ("--config-profile", profile)) if v]
    if len(given) > 1:
        raise ConfigError(f"give only one of {', '.join(given)}")
    if config_text:
        return parse(config_text, "<config-text>")
    if config_file:
        try:
            text = Path(config_file).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read --config-file {config_file}: {e.strerror}") from None
        return parse(text, config_file)
    name = profile or os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE
    path = profile_path(name)
    loaded = parse(path.read_text(), str(path))
    loaded.profile = name
    return loaded


# -- parsing ------------------------------------------------------------------------------------


def _line_map(node: yaml.Node, path: tuple, out: dict[tuple, int]) -> None:
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            k = key.value
            out[path + (k,)] = key.start_mark.line + 1
            _line_map(value, path + (k,), out)
            out[path + (k,)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_map(item, path + (i,), out)


def parse(text: str, source: str) -> LoadedConfig:
    loaded = LoadedConfig(source=source, text=text)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if node is not None:
        _line_map(node, (), loaded.lines)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise loaded.error((), f"must be a YAML map with kind: {KIND}")
    loaded.data = data
    validate_shape(loaded)
    return loaded


def validate_shape(cfg: LoadedConfig) -> None:
    d = cfg.data
    api = d.get("apiVersion")
    if api is not None and api not in API_VERSIONS:
        raise cfg.error(("apiVersion",), f"unsupported {api!r}; use {API_VERSIONS[0]}")
    kind = d.get("kind")
    if kind is not None and kind != KIND:
        raise cfg.error(("kind",), f"must be {KIND}, got {kind!r}")
    known = {"apiVersion", "kind", "plugins", "schedulingProfiles", "featureGates", "saturationDetector", "data", "flowControl", "parser"}
    for k in d:
        if k not in known:
            raise cfg.error((k,), f"unknown field; expected one of {', '.join(sorted(known))}")
    plugins = d.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        raise cfg.error(("plugins",), "must be a non-empty list of {type, name, parameters}")
    names: set[str] = set()
    for i, p in enumerate(plugins):
        if not isinstance(p, dict):
            raise cfg.error(("plugins", i), "must be a map with 'type' (and optional 'name', 'parameters')")
        for k in p:
            if k not in ("type", "name", "parameters"):
                raise cfg.error(("plugins", i, k), "unknown field; expected type, name or parameters")
        t = p.get("type")
        if not isinstance(t, str) or not t:
            raise cfg.error(("plugins", i, "type"), "is required and must be a plugin type name")
        name = p.get("name") or t
        if not isinstance(name, str):
            raise cfg.error(("plugins", i, "name"), "must be a string")
        if name in names:
            raise cfg.error(("plugins", i, "name"), f"duplicate plugin name {name!r}")
        names.add(name)
        params = p.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise cfg.error(("plugins", i, "parameters"), "must be a map")
    profiles = d.get("schedulingProfiles")
    if profiles is None:
        return
    if not isinstance(profiles, list) or not profiles:
        raise cfg.error(("schedulingProfiles",), "must be a non-empty list of {name, plugins}")
    pnames: set[str] = set()
    for i, prof in enumerate(profiles):
        if not isinstance(prof, dict) or not isinstance(prof.get("name"), str):
            raise cfg.error(("schedulingProfiles", i), "must be a map with a 'name' and 'plugins'")
        if prof["name"] in pnames:
            raise cfg.error(("schedulingProfiles", i, "name"), f"duplicate profile name {prof['name']!r}")
        pnames.add(prof["name"])
        refs = prof.get("plugins") or []
        if not isinstance(refs, list):
            raise cfg.error(("schedulingProfiles", i, "plugins"), "must be a list of {pluginRef, weight}")
        for j, ref in enumerate(refs):
            at = ("schedulingProfiles", i, "plugins", j)
            if not isinstance(ref, dict) or not isinstance(ref.get("pluginRef"), str):
                raise cfg.error(at, "must be a map with 'pluginRef' naming a plugin")
            if ref["pluginRef"] not in names:
                raise cfg.error(at + ("pluginRef",), f"no plugin named {ref['pluginRef']!r}; defined: {', '.join(sorted(names))}")
            w = ref.get("weight", 1)
            if not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0:
                raise cfg.error(at + ("weight",), f"must be a number >= 0, got {w!r}")


# -- building -----------------------------------------------------------------------------------


@dataclass(slots=True)
class BuiltConfig:
    scheduler: Scheduler
    plugins: dict[str, Any]


def build_scheduler(
    cfg: LoadedConfig, ctx: PluginContext | None = None, observer: Observer | None = None
) -> Scheduler:
    return build(cfg, ctx, observer).scheduler


def build(cfg: LoadedConfig, ctx: PluginContext | None = None, observer: Observer | None = None) -> BuiltConfig:
    ctx = ctx or PluginContext()
    instances: dict[str, Any] = {}
    for i, p in enumerate(cfg.data["plugins"]):
        name = p.get("name") or p["type"]
        try:
            instances[name] = registry.create(p["type"], name, p.get("parameters") or {}, ctx)
        except ConfigError as e:
            text = str(e)
            field_path: tuple = ("plugins", i, "type") if "unknown plugin type" in text else ("plugins", i, "parameters")
            for key in p.get("parameters") or {}:
                if f": {key} " in text or f": {key}:" in text or f": {key}." in text:
                    field_path = ("plugins", i, "parameters", key)  # point at the offending parameter's line
                    break
            raise cfg.error(field_path, text) from None
    try:
        registry.link_producers(instances, ctx)  # consumers find (or get) their data producers
    except ConfigError as e:
        at = next((i for i, p in enumerate(cfg.data["plugins"]) if (p.get("name") or p["type"]) == getattr(e, "plugin", None)), None)
        raise cfg.error(("plugins",) if at is None else ("plugins", at, "parameters"), str(e)) from None
    handlers = [p for p in instances.values() if isinstance(p, ProfileHandler)]
    if len(handlers) > 1:
        raise cfg.error(("plugins",), f"only one profile handler may be configured, found {[h.name for h in handlers]}")
    handler = handlers[0] if handlers else registry.create("single-profile-handler", "single-profile-handler", {}, ctx)
    raw_profiles = cfg.data.get("schedulingProfiles") or [
        {"name": "default", "plugins": [{"pluginRef": n} for n, p in instances.items() if isinstance(p, (Filter, Scorer, Picker))]}
    ]
    profiles: dict[str, SchedulerProfile] = {}
    for i, rp in enumerate(raw_profiles):
        prof = SchedulerProfile(name=rp["name"])
        for j, ref in enumerate(rp.get("plugins") or []):
            plugin = instances[ref["pluginRef"]]
            at = ("schedulingProfiles", i, "plugins", j)
            used = False
            if isinstance(plugin, Filter):
                prof.filters.append(plugin)
                used = True
            if isinstance(plugin, Scorer):
                prof.scorers.append(WeightedScorer(plugin, float(ref.get("weight", 1))))
                used = True
            if isinstance(plugin, Picker):
                if prof.picker is not None:
                    raise cfg.error(at, f"profile {prof.name!r} already has picker {prof.picker.name!r}")
                prof.picker = plugin
                used = True
            if not used:
                raise cfg.error(at, f"plugin {ref['pluginRef']!r} is not a filter, scorer or picker")
        if prof.picker is None:
            prof.picker = registry.create("max-score-picker", "max-score-picker", {}, ctx)
        profiles[prof.name] = prof
    if handler.type_name == "single-profile-handler" and len(profiles) != 1:
        raise cfg.error(("schedulingProfiles",), f"single-profile-handler needs exactly one profile, found {len(profiles)}")
    scheduler = Scheduler(handler, profiles, plugins=[handler, *instances.values()], observer=observer)
    return BuiltConfig(scheduler, instances)


def validate_file(path: str) -> BuiltConfig:
    """Parse and build (plugins constructed, nothing started): what `epp profiles validate` runs."""
    return build(resolve_config(config_file=path))


def show_profile(name: str) -> str:
    return profile_path(name).read_text()
