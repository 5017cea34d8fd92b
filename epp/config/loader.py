"""EndpointPickerConfig: load, check (every error at once, each with file, line and field), build.

Accepts the Go EPP's format unchanged, llm-d v0.10's and GIE's spellings alike:

    apiVersion: llm-d.ai/v1alpha1          # or inference.networking.x-k8s.io/v1alpha1 (deprecated)
    kind: EndpointPickerConfig
    featureGates: [flowControl]            # name, name=true or name=false
    plugins: [{name, type, parameters}]
    schedulingProfiles: [{name, plugins: [{pluginRef, weight}]}]
    dataLayer: {injectDefaults, sources: [{pluginRef, extractors}], discovery}   # GIE v1.3–1.4: data
    requestHandler: {parsers: [{pluginRef}]}                                       # deprecated: parser
    flowControl: {maxBytes, maxRequests, defaultRequestTTL, priorityBands, saturationDetector, …}
    saturationDetector: {pluginRef}                                                # deprecated

Defaulting follows GIE/llm-d: no profile handler → single-profile-handler; a profile without a
picker → max-score-picker; no schedulingProfiles → one `default` profile of every filter, scorer
and picker; scorer weight 1; no parser → openai-parser; no saturation detector →
utilization-detector. Nothing is silently ignored: a section, gate or plugin either does here what
it does in the Go EPP, or the load fails naming it; deprecated spellings load with a warning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

from epp.config import schema
from epp.config.go_epp_ignored import strip_ignored
from epp.config.go_epp_types import explain_unknown
from epp.flowcontrol.controller import BandTemplate, FlowControlSettings
from epp.flowcontrol.types import FairnessPolicy, OrderingPolicy, SaturationDetector, UsageLimitPolicy
from epp.requesthandling.parsers import ParserChain, is_parser
from epp.scheduling import registry
from epp.scheduling.framework import CandidateGate, ConfigError, Filter, Picker, ProfileHandler, SchedulerProfile, Scorer, WeightedScorer
from epp.scheduling.registry import PluginContext
from epp.scheduling.scheduler import Observer, Scheduler
from epp.util.duration import parse_duration
from epp.util.quantity import parse_quantity

API_VERSION = "llm-d.ai/v1alpha1"
DEPRECATED_API_VERSIONS = ("inference.networking.x-k8s.io/v1alpha1",)
KIND = "EndpointPickerConfig"
PROFILES_DIR = Path(__file__).resolve().parent.parent.parent / "profiles"
PROFILE_ENV = "EPP_CONFIG_PROFILE"
DEFAULT_PROFILE = "default"

# Feature gates: name -> (default, what it means here). Every gate either works or is refused.
FEATURE_GATES: dict[str, tuple[bool, str]] = {
    "flowControl": (False, "requests queue in priority bands until the pool has room (flowControl section)"),
    "haPopulateNonLeaderDatastore": (True, "replicas that are not the leader keep discovering endpoints, ready to take over"),
    # GIE gates whose behaviour is always on here (as in GIE's final EPP, where they became no-ops)
    "dataLayer": (True, "GIE v1.2–v1.5: the data layer (metrics sources and extractors) is always on here"),
    "prepareDataPlugins": (True, "GIE v1.3–v1.4: data producers always run before scheduling here"),
    "enableLegacyMetrics": (True, "GIE v1.5: endpoint metrics are always polled from each endpoint's /metrics here"),
}
ALWAYS_ON_GATES = ("dataLayer", "prepareDataPlugins", "enableLegacyMetrics")
DEFAULT_DETECTOR = "utilization-detector"
DEFAULT_PARSER = "openai-parser"


@dataclass(slots=True)
class LoadedConfig:
    """The config text and where it came from (shown in errors and at startup)."""

    source: str  # a file path, "<config-text>" or "profile NAME (path)"
    text: str
    profile: str | None = None
    data: Any = field(default_factory=dict)
    lines: dict[tuple, int] = field(default_factory=dict)

    def line_of(self, *path: Any) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), None)

    def where(self, path: tuple) -> str:
        line = self.line_of(*path)
        where = f"{self.source}:{line}" if line else self.source
        dotted = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in path).replace(".[", "[")
        return f"{where}: {dotted or 'config'}"

    def error(self, path: tuple, message: str) -> ConfigError:
        return ConfigError(f"{self.where(path)}: {message}")


class ConfigErrors(ConfigError):
    """Every problem found in one config, one `file:line: field: message` per line."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        head = problems[0] if len(problems) == 1 else f"{len(problems)} problems in {source}:\n  " + "\n  ".join(problems)
        super().__init__(head)


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
            _line_map(value, path + (k,), out)
            out[path + (k,)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_map(item, path + (i,), out)


def parse(text: str, source: str) -> LoadedConfig:
    """YAML → data with a line for every field. Only invalid YAML fails here; `build` checks the rest."""
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
    loaded.data = {} if data is None else data
    return loaded


# -- building -----------------------------------------------------------------------------------


@dataclass(slots=True)
class DataLayer:
    """What the data layer does: scrape metrics (and how), and where endpoints come from."""

    metrics_source: Any = None  # MetricsDataSource, or None when metrics collection is off
    explicit: bool = False  # sources were configured (scrape even if no scheduling plugin needs metrics)
    discovery: Any = None  # an endpoint-discovery plugin (file-discovery), or None for the flags' source


@dataclass(slots=True)
class BuiltConfig:
    scheduler: Scheduler
    plugins: dict[str, Any]
    parsers: ParserChain = field(default_factory=lambda: ParserChain([]))
    saturation_detector: Any = None
    flow_control: FlowControlSettings | None = None  # set when the flowControl gate is on
    feature_gates: dict[str, bool] = field(default_factory=dict)
    data_layer: DataLayer = field(default_factory=DataLayer)
    warnings: list[str] = field(default_factory=list)
    shared: dict[str, Any] = field(default_factory=dict)  # objects plugins share (default producers)

    def all_plugins(self) -> Iterator[Any]:
        seen: set[int] = set()
        for p in (*self.plugins.values(), *self.shared.values(), self.saturation_detector):
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                yield p


class _Tracked(dict):
    """Plugin parameters that remember which keys the factory read: the rest are unknown fields."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        super().__init__(data)
        self.read: set[str] = set()

    def get(self, key: Any, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: Any) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: Any) -> bool:
        self.read.add(key)
        return super().__contains__(key)

    def _all(self) -> None:
        self.read.update(self.keys())

    def items(self):  # type: ignore[override]
        self._all()
        return super().items()

    def values(self):  # type: ignore[override]
        self._all()
        return super().values()

    def __iter__(self):
        self._all()
        return super().__iter__()

    def copy(self) -> dict:  # type: ignore[override]
        self._all()
        return dict(super().items())

    def unread(self) -> list[str]:
        return [k for k in self.keys() if k not in self.read]


class _Builder:
    """One pass over a config that collects every problem instead of stopping at the first."""

    def __init__(self, cfg: LoadedConfig, ctx: PluginContext, allow_experimental: bool) -> None:
        self.cfg = cfg
        self.shared: dict[str, Any] = {}
        services = dict(ctx.services or {})
        services["shared"] = self.shared
        self.ctx = PluginContext(datastore=ctx.datastore, services=services)
        self.allow_experimental = allow_experimental
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self.instances: dict[str, Any] = {}
        self.plugin_index: dict[str, int] = {}
        self.failed: set[str] = set()  # configured plugins that could not be built (already reported)

    def error(self, path: tuple, message: str) -> None:
        self.problems.append(f"{self.cfg.where(path)}: {message}")

    def warn(self, path: tuple, message: str) -> None:
        self.warnings.append(f"{self.cfg.where(path)}: {message}")

    def section(self, key: str) -> Any:
        d = self.cfg.data
        value = d.get(key) if isinstance(d, dict) else None
        return value if isinstance(value, dict) else None

    # -- top level --------------------------------------------------------------------------------
    def header(self) -> None:
        d = self.cfg.data
        api = d.get("apiVersion")
        if isinstance(api, str):
            if api in DEPRECATED_API_VERSIONS:
                self.warn(("apiVersion",), f"DEPRECATION: {api} is deprecated; use {API_VERSION}")
            elif api != API_VERSION:
                self.error(("apiVersion",), f"unsupported {api!r}; use {API_VERSION} (or the deprecated {DEPRECATED_API_VERSIONS[0]})")
        kind = d.get("kind")
        if isinstance(kind, str) and kind != KIND:
            self.error(("kind",), f"must be {KIND}, got {kind!r}")

    def feature_gates(self) -> dict[str, bool]:
        gates = {name: default for name, (default, _) in FEATURE_GATES.items()}
        raw = self.cfg.data.get("featureGates")
        if not isinstance(raw, list):
            return gates
        for i, entry in enumerate(raw):
            if not isinstance(entry, str):
                continue
            name, _, value = entry.partition("=")
            name = name.strip()
            if name not in FEATURE_GATES:
                self.error(("featureGates", i), f"feature gate {name!r} is unknown; known gates: {', '.join(FEATURE_GATES)}")
                continue
            enabled = True
            if value:
                v = value.strip().lower()
                if v not in ("true", "false", "1", "0", "t", "f"):
                    self.error(("featureGates", i), f"{value!r} is not a valid value for the feature gate {name} (use true or false)")
                    continue
                enabled = v in ("true", "1", "t")
            if name in ALWAYS_ON_GATES:
                if not enabled:
                    self.error(("featureGates", i), f"{name} cannot be turned off here: {FEATURE_GATES[name][1]}")
                    continue
                self.warn(("featureGates", i), f"{name}: {FEATURE_GATES[name][1]}; the gate changes nothing")
            gates[name] = enabled
        return gates

    # -- plugins ------------------------------------------------------------------------------------
    def plugins(self) -> None:
        raw = self.cfg.data.get("plugins")
        if not isinstance(raw, list):
            return
        for i, p in enumerate(raw):
            if not isinstance(p, dict) or not isinstance(p.get("type"), str) or not p["type"]:
                continue
            name = p.get("name") or p["type"]
            if not isinstance(name, str):
                continue
            if name in self.plugin_index:
                self.error(("plugins", i, "name"), f"duplicate plugin name {name!r} (also plugins[{self.plugin_index[name]}])")
                continue
            self.plugin_index[name] = i
            params = p.get("parameters") or {}
            if not isinstance(params, dict):
                continue
            plugin = self.create(p["type"], name, params, ("plugins", i))
            if plugin is not None:
                self.instances[name] = plugin
            else:
                self.failed.add(name)

    def link_producers(self) -> None:
        """Consumers find (or get) their data producers; producers created here join the instances."""
        try:
            registry.link_producers(self.instances, self.ctx)
        except ConfigError as e:
            name = getattr(e, "plugin", None)
            at = ("plugins",) if name not in self.plugin_index else ("plugins", self.plugin_index[name], "parameters")
            self.error(at, str(e))

    def bind(self) -> None:
        """Plugins that name other plugins (a P/D handler's deciders) find them once all are built."""
        for name, plugin in list(self.instances.items()):
            bind = getattr(plugin, "bind_plugins", None)
            if bind is None:
                continue
            try:
                bind(self.instances)
            except ConfigError as e:
                self.error(("plugins", self.plugin_index.get(name, 0), "parameters"), str(e))

    def create(self, type_name: str, name: str, params: Mapping[str, Any], at: tuple) -> Any:
        reg = registry.registered(type_name)
        if reg is None:
            self.error(at + ("type",), explain_unknown(type_name, registry.known_types()))
            return None
        if reg.deprecated_alias_of:
            self.warn(at + ("type",), f"DEPRECATION: plugin type {type_name!r} is deprecated; use {reg.deprecated_alias_of!r}")
        if reg.experimental and not self.allow_experimental:
            self.error(at + ("type",), f"plugin type {type_name!r} is experimental (alpha); start the EPP with --allow-experimental-plugins to load it")
            return None
        params, ignored = strip_ignored(type_name, params)
        for path, reason in ignored:
            self.warn(at + ("parameters", *path), f"ignored: {reason}")
        tracked = _Tracked(params)
        try:
            plugin = reg.factory(name, tracked, self.ctx)
        except ConfigError as e:
            text = str(e)
            path = at + ("parameters",)
            for key in params:
                if any(f"{sep}{key}{end}" in f": {text}" for sep in (": ", "; ") for end in (" ", ":", ".", "[", ",")):
                    path = at + ("parameters", key)  # point at the offending parameter's line
                    break
            self.error(path, text)
            return None
        for key in tracked.unread():
            self.error(at + ("parameters", key), f"unknown parameter for {type_name!r}")
        return plugin

    def default_plugin(self, type_name: str) -> Any:
        """A plugin the config did not name but needs (GIE's system defaults), created once."""
        if type_name in self.instances:
            return self.instances[type_name]
        plugin = registry.create(type_name, type_name, {}, self.ctx)
        self.instances[type_name] = plugin
        return plugin

    def ref(self, path: tuple, name: Any, what: str, ok: Any) -> Any:
        """The plugin a `pluginRef` names, if it exists and is the right kind (else an error)."""
        if not isinstance(name, str):
            return None
        plugin = self.instances.get(name)
        if plugin is None:
            if name not in self.plugin_index:  # a plugin that failed to build was reported already
                self.error(path, f"no plugin named {name!r}; defined: {', '.join(sorted(self.plugin_index)) or 'none'}")
            return None
        if not ok(plugin):
            self.error(path, f"plugin {name!r} ({plugin.type_name}) is not a {what}")
            return None
        return plugin

    # -- scheduling -------------------------------------------------------------------------------
    def scheduler(self) -> tuple[Any, dict[str, SchedulerProfile]] | None:
        handlers = [n for n, p in self.instances.items() if isinstance(p, ProfileHandler)]
        if len(handlers) > 1:
            self.error(("plugins",), f"only one profile handler may be configured, found {', '.join(handlers)}")
        handler = self.instances[handlers[0]] if handlers else registry.create("single-profile-handler", "single-profile-handler", {}, self.ctx)
        gates = [n for n, p in self.instances.items() if isinstance(p, CandidateGate)]
        if len(gates) > 1:
            self.error(("plugins",), f"only one endpoint-health plugin may be configured, found {', '.join(gates)}")
        raw_profiles = self.cfg.data.get("schedulingProfiles")
        if raw_profiles is None:
            raw_profiles = [{"name": "default", "plugins": [
                {"pluginRef": n} for n, p in self.instances.items() if isinstance(p, (Filter, Scorer, Picker)) and not isinstance(p, ProfileHandler)]}]
        if not isinstance(raw_profiles, list):
            return None
        profiles: dict[str, SchedulerProfile] = {}
        default_picker = next((p for p in self.instances.values() if isinstance(p, Picker)), None)
        for i, rp in enumerate(raw_profiles):
            if not isinstance(rp, dict) or not isinstance(rp.get("name"), str):
                continue
            if rp["name"] in profiles:
                self.error(("schedulingProfiles", i, "name"), f"duplicate profile name {rp['name']!r}")
                continue
            prof = SchedulerProfile(name=rp["name"])
            refs = rp.get("plugins") if isinstance(rp.get("plugins"), list) else []
            for j, ref in enumerate(refs):
                if not isinstance(ref, dict):
                    continue
                at = ("schedulingProfiles", i, "plugins", j)
                plugin = self.ref(at + ("pluginRef",), ref.get("pluginRef"), "plugin", lambda p: True)
                if plugin is None:
                    continue
                if isinstance(plugin, CandidateGate):
                    self.warn(at + ("pluginRef",), f"plugin {ref['pluginRef']!r} ({plugin.type_name}) applies to the whole pool before "
                                                   "any profile runs; listing it in a scheduling profile has no effect")
                    continue
                if not isinstance(plugin, (Filter, Scorer, Picker)):
                    # The Go EPP skips such entries too; say so instead of doing it silently.
                    self.warn(at + ("pluginRef",), f"plugin {ref['pluginRef']!r} ({plugin.type_name}) is not a filter, scorer or picker; "
                                                   "listing it in a scheduling profile has no effect")
                    continue
                weight = ref.get("weight", 1)
                if isinstance(plugin, Filter):
                    prof.filters.append(plugin)
                if isinstance(plugin, Scorer):
                    prof.scorers.append(WeightedScorer(plugin, float(weight) if isinstance(weight, (int, float)) else 1.0))
                if isinstance(plugin, Picker):
                    if prof.picker is not None:
                        self.error(at, f"profile {prof.name!r} already has picker {prof.picker.name!r}")
                    prof.picker = plugin
            if prof.picker is None:
                prof.picker = default_picker or self.default_plugin("max-score-picker")
            profiles[prof.name] = prof
        if not profiles:
            return None
        if getattr(handler, "type_name", "") == "single-profile-handler" and len(profiles) != 1 and not self.failed:
            self.error(("schedulingProfiles",), f"single-profile-handler needs exactly one profile, found {len(profiles)}")
            return None
        check = getattr(handler, "check_profiles", None)  # e.g. a disagg handler needs its decode profile
        if check is not None:
            try:
                check(list(profiles))
            except ConfigError as e:
                self.error(("schedulingProfiles",), str(e))
                return None
        return handler, profiles

    # -- request handling -------------------------------------------------------------------------
    def parsers(self) -> ParserChain:
        rh = self.section("requestHandler")
        refs = rh.get("parsers") if rh and isinstance(rh.get("parsers"), list) else None
        base: tuple = ("requestHandler", "parsers")
        old = self.section("parser")
        if old is not None:
            if refs:
                self.warn(("parser",), "DEPRECATION: top-level parser is deprecated and requestHandler.parsers is also set; requestHandler.parsers is used")
            else:
                self.warn(("parser",), "DEPRECATION: top-level parser is deprecated; use requestHandler.parsers")
                refs, base = [old], ("parser",)
        if not refs:
            return ParserChain([self.instances.get(DEFAULT_PARSER) if is_parser(self.instances.get(DEFAULT_PARSER))
                                else self.default_plugin(DEFAULT_PARSER)])
        chain = []
        for i, ref in enumerate(refs):
            if not isinstance(ref, dict):
                continue
            path = base + ((i, "pluginRef") if base[-1] == "parsers" else ("pluginRef",))
            p = self.ref(path, ref.get("pluginRef"), "parser", is_parser)
            if p is not None:
                chain.append(p)
        return ParserChain(chain)

    # -- data layer -----------------------------------------------------------------------------------
    def data_layer(self) -> DataLayer:
        dl_new, dl_old = self.section("dataLayer"), self.section("data")
        key = "dataLayer"
        dl = dl_new
        if dl_old is not None:
            if dl_new is not None:
                self.error(("data",), "give dataLayer or its older spelling data, not both")
            else:
                self.warn(("data",), "DEPRECATION: data is GIE v1.3–v1.4's spelling; use dataLayer")
                dl, key = dl_old, "data"
        out = DataLayer()
        if dl is None:
            out.metrics_source = self.default_plugin("metrics-data-source")
            return out
        sources = dl.get("sources") if isinstance(dl.get("sources"), list) else []
        for i, src in enumerate(sources):
            if not isinstance(src, dict):
                continue
            s = self.ref((key, "sources", i, "pluginRef"), src.get("pluginRef"), "data source", lambda p: getattr(p, "data_source", False))
            if s is not None:
                if out.metrics_source is not None:
                    self.error((key, "sources", i), "only one metrics data source is supported here")
                out.metrics_source, out.explicit = s, True
            for j, ex in enumerate(src.get("extractors") or []):
                if isinstance(ex, dict):
                    self.ref((key, "sources", i, "extractors", j, "pluginRef"), ex.get("pluginRef"), "data extractor",
                             lambda p: getattr(p, "data_extractor", False))
        if out.metrics_source is None and dl.get("injectDefaults", True) is not False:
            out.metrics_source = self.default_plugin("metrics-data-source")
        if out.metrics_source is None:
            self.warn((key,), "no data sources: endpoint metrics are not collected, so metric-based scorers and detectors see none")
        disc = dl.get("discovery")
        if isinstance(disc, dict):
            out.discovery = self.ref((key, "discovery", "pluginRef"), disc.get("pluginRef"), "endpoint discovery plugin",
                                     lambda p: getattr(p, "endpoint_discovery", False))
        for field_name in ("peerDiscovery", "crossReplicaSyncerPluginRef", "crossReplicaSyncInterval"):
            if dl.get(field_name) is not None:
                self.error((key, field_name), "cross-replica state sync (active-active) is not implemented here; "
                                              "run replicas active-passive with --ha-enable-leader-election")
        return out

    # -- admission and flow control -------------------------------------------------------------------
    def saturation_detector(self) -> Any:
        fc = self.section("flowControl")
        new = fc.get("saturationDetector") if fc else None
        old = self.section("saturationDetector")
        chosen, path = (new, ("flowControl", "saturationDetector")) if isinstance(new, dict) else (None, ())
        if old is not None:
            if chosen is not None:
                self.warn(("saturationDetector",), "DEPRECATION: top-level saturationDetector is deprecated and flowControl.saturationDetector is also set; the latter is used")
            else:
                self.warn(("saturationDetector",), "DEPRECATION: top-level saturationDetector is deprecated; use flowControl.saturationDetector")
                chosen, path = old, ("saturationDetector",)
        if chosen is None:
            return self.default_plugin(DEFAULT_DETECTOR)
        thresholds = {k: chosen[k] for k in ("queueDepthThreshold", "kvCacheUtilThreshold", "metricsStalenessThreshold") if k in chosen}
        if thresholds:  # GIE v1.2–v1.4: the utilization detector's thresholds written inline
            if chosen.get("pluginRef"):
                self.error(path, "give pluginRef or inline thresholds (GIE v1.2–v1.4), not both")
                return None
            self.warn(path, "DEPRECATION: inline saturationDetector thresholds are GIE v1.2–v1.4's form; define a utilization-detector plugin and reference it")
            return self.create(DEFAULT_DETECTOR, DEFAULT_DETECTOR, thresholds, path)
        ref = chosen.get("pluginRef") or DEFAULT_DETECTOR
        if ref == DEFAULT_DETECTOR and ref not in self.plugin_index:
            return self.default_plugin(DEFAULT_DETECTOR)
        return self.ref(path + ("pluginRef",), ref, "saturation detector", lambda p: isinstance(p, SaturationDetector))

    def flow_control(self, enabled: bool, detector: Any) -> FlowControlSettings | None:
        fc = self.section("flowControl")
        settings_given = fc is not None and any(k != "saturationDetector" and fc.get(k) is not None for k in fc)
        if not enabled:
            if settings_given:
                self.warn(("flowControl",), "the flowControl section is set but the flowControl feature gate is off: "
                                            "nothing queues and its settings (other than saturationDetector) have no effect; add featureGates: [flowControl]")
            return None
        fc = fc or {}
        if fc.get("enableEviction"):
            self.error(("flowControl", "enableEviction"), "in-flight eviction is not implemented here; remove it (requests already dispatched always finish)")
        policy = lambda kind, proto, default: self._policy(kind, proto, default)  # noqa: E731
        usage_ref = fc.get("usageLimitPolicyPluginRef")
        usage = (self.ref(("flowControl", "usageLimitPolicyPluginRef"), usage_ref, "usage limit policy", lambda p: isinstance(p, UsageLimitPolicy))
                 if usage_ref else self.default_plugin("static-usage-limit-policy"))
        settings = FlowControlSettings(
            detector=detector,
            usage_limit=usage,
            fairness=policy(None, FairnessPolicy, "global-strict-fairness-policy"),
            ordering=policy(None, OrderingPolicy, "fcfs-ordering-policy"),
            max_bytes=self._quantity(fc, ("flowControl",), "maxBytes", 0),
            max_requests=self._quantity(fc, ("flowControl",), "maxRequests", 0),
            default_ttl=self._duration(fc, ("flowControl",), "defaultRequestTTL", 60.0),
            no_endpoint_ttl=self._duration(fc, ("flowControl",), "noEndpointRequestTTL", None),
        )
        if isinstance(fc.get("defaultPriorityBand"), dict):
            settings.default_band = self._band(fc["defaultPriorityBand"], ("flowControl", "defaultPriorityBand"))
        if isinstance(fc.get("defaultNegativePriorityBand"), dict):
            settings.negative_band = self._band(fc["defaultNegativePriorityBand"], ("flowControl", "defaultNegativePriorityBand"))
        for i, band in enumerate(fc.get("priorityBands") or []):
            if isinstance(band, dict) and isinstance(band.get("priority"), int):
                if band["priority"] in settings.bands:
                    self.error(("flowControl", "priorityBands", i, "priority"), f"priority {band['priority']} is configured twice")
                settings.bands[band["priority"]] = self._band(band, ("flowControl", "priorityBands", i))
        return settings

    def _policy(self, ref: str | None, proto: Any, default: str, path: tuple = ()) -> Any:
        if not ref:
            return self.instances.get(default) if isinstance(self.instances.get(default), proto) else self.default_plugin(default)
        if ref not in self.plugin_index and registry.registered(ref) is not None:
            return self.default_plugin(ref)  # a policy named by its type, as llm-d's docs do
        return self.ref(path, ref, proto.__name__, lambda p: isinstance(p, proto))

    def _band(self, band: Mapping[str, Any], path: tuple) -> BandTemplate:
        fairness = self._policy(band.get("fairnessPolicyRef"), FairnessPolicy, "", path + ("fairnessPolicyRef",)) if band.get("fairnessPolicyRef") else None
        ordering = self._policy(band.get("orderingPolicyRef"), OrderingPolicy, "", path + ("orderingPolicyRef",)) if band.get("orderingPolicyRef") else None
        return BandTemplate(
            max_bytes=self._quantity(band, path, "maxBytes", 0) or BandTemplate.max_bytes,
            max_requests=self._quantity(band, path, "maxRequests", 0) or BandTemplate.max_requests,
            fairness=fairness,
            ordering=ordering,
        )

    def _quantity(self, d: Mapping[str, Any], path: tuple, key: str, default: int) -> int:
        try:
            return parse_quantity(d[key]) if d.get(key) is not None else default
        except ValueError:
            return default  # reported by the schema check

    def _duration(self, d: Mapping[str, Any], path: tuple, key: str, default: float | None) -> float | None:
        try:
            return parse_duration(d[key]) if d.get(key) is not None else default
        except ValueError:
            return default  # reported by the schema check


def build(cfg: LoadedConfig, ctx: PluginContext | None = None, observer: Observer | None = None, *,
          allow_experimental: bool = False) -> BuiltConfig:
    """Check the whole config and build every part of it; ConfigErrors lists every problem found."""
    b = _Builder(cfg, ctx or PluginContext(), allow_experimental)
    schema.check_config(cfg.data, b.error)
    if not isinstance(cfg.data, dict):
        raise ConfigErrors(cfg.source, _by_line(b.problems))
    b.header()
    gates = b.feature_gates()
    b.plugins()
    if not b.failed:  # a consumer may name a plugin that failed to build (already reported)
        b.link_producers()
    b.bind()
    shape = b.scheduler()
    parsers = b.parsers()
    data_layer = b.data_layer()
    detector = b.saturation_detector()
    flow = b.flow_control(gates["flowControl"], detector)
    if b.problems or shape is None:
        if not b.problems:
            b.error(("schedulingProfiles",), "no usable scheduling profile")
        raise ConfigErrors(cfg.source, _by_line(b.problems))
    handler, profiles = shape
    # every plugin gets the request lifecycle hooks, including defaults and shared producers
    hooked = list({id(p): p for p in (handler, *b.instances.values(), *b.shared.values())}.values())
    scheduler = Scheduler(handler, profiles, plugins=hooked, observer=observer)
    return BuiltConfig(scheduler, dict(b.instances), parsers, detector, flow, gates, data_layer, b.warnings, dict(b.shared))


def _by_line(problems: list[str]) -> list[str]:
    """Unique problems in file order (the line number after the first colon)."""

    def line(p: str) -> int:
        head = p.split(": ", 1)[0]
        tail = head.rsplit(":", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    return sorted(dict.fromkeys(problems), key=line)


def build_scheduler(cfg: LoadedConfig, ctx: PluginContext | None = None, observer: Observer | None = None) -> Scheduler:
    return build(cfg, ctx, observer).scheduler


def validate_file(path: str, allow_experimental: bool = False) -> BuiltConfig:
    """Parse and build (plugins constructed, nothing started): what `epp profiles validate` runs."""
    return build(resolve_config(config_file=path), allow_experimental=allow_experimental)


def show_profile(name: str) -> str:
    return profile_path(name).read_text()
