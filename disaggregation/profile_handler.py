"""disagg-profile-handler (and the deprecated pd-profile-handler): llm-d's P/D (and E/P/D) scheduling.

decode-first (default): the decode profile picks the decode pod — the Envoy destination, where
the request lands on its sidecar; the encode decider may add an encode stage; the prefill
decider, shown the decode pick, decides whether a prefill profile picks a prefill pod. In
prefill-first order the prefill profile runs first (no decider) and the decode profile after it.
A stage that runs publishes the earlier pick as the peer endpoint, so pair-aware plugins of the
later profile (link guardrail, pair latency) judge each candidate by the link it would use.

PreRequest writes `x-prefiller-host-port: ip:port` (and `x-encoder-hosts-ports`) for the
sidecar; the ext_proc handler forwards them (client-sent values never pass). Each request's
outcome counts in `llm_d_epp_disagg_decision_total{decision_type}` and is explained in the
`Scoring decision` event under `notes.disaggregation`: both picks, the decider and its reason.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from disaggregation.deciders import Decider, Decision
from disaggregation.metrics import DECODE_ONLY, PREFILL_DECODE, DisaggMetrics, decision_type, disagg_metrics
from epp.datastore.endpoint import Endpoint
from epp.observability.logging import get_logger
from epp.scheduling.estimates import cached_tokens
from epp.scheduling.framework import (
    PEER_ENDPOINT_KEY,
    STAGE_KEY,
    ConfigError,
    CycleState,
    LLMRequest,
    ProfileRunResult,
    SchedulerProfile,
    SchedulingResult,
)
from epp.scheduling.registry import PluginContext, register, reject_unknown

PREFILL_HEADER = "x-prefiller-host-port"
ENCODERS_HEADER = "x-encoder-hosts-ports"
DATA_PARALLEL_HEADER = "x-data-parallel-host-port"
DECODE_FIRST, PREFILL_FIRST = "decode-first", "prefill-first"
NOTE_KEY = "disaggregation"  # where the decision log's explanation lives (CycleState.notes)

_log = get_logger("epp.disaggregation")


def parse_stage_order(value: Any) -> str:
    """llm-d's ParseStageOrder: case, '-' and '_' do not matter; empty means decode-first."""
    text = str(value or "").lower().replace("-", "").replace("_", "")
    if text in ("", "decodefirst", "decode"):
        return DECODE_FIRST
    if text in ("prefillfirst", "prefill"):
        return PREFILL_FIRST
    raise ConfigError(f"invalid stage order {value!r}, must be {DECODE_FIRST!r} or {PREFILL_FIRST!r}")


@dataclass(slots=True)
class _Cycle:
    """One request's progress through the stages (kept in its CycleState)."""

    decided: dict[str, Decision] = dataclasses.field(default_factory=dict)  # stage -> decider's answer
    skipped: set[str] = dataclasses.field(default_factory=set)
    done: bool = False


class DisaggProfileHandler:
    type_name = "disagg-profile-handler"
    metric_kind = "disagg"

    def __init__(self, name: str, metrics: DisaggMetrics, *, stage_order: str = DECODE_FIRST,
                 profiles: Mapping[str, str] | None = None, deciders: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.metrics = metrics
        self.stage_order = stage_order
        self.profiles = {"decode": "decode", "prefill": "prefill", "encode": "encode", **(profiles or {})}
        self.decider_names = {k: v for k, v in (deciders or {}).items() if v}
        self.deciders: dict[str, Decider] = {}
        self._key = f"{name}/cycle"

    # -- configuration ----------------------------------------------------------------------------
    def bind_plugins(self, instances: Mapping[str, Any]) -> None:
        for stage, ref in self.decider_names.items():
            plugin = instances.get(ref)
            if plugin is None:
                raise ConfigError(f"plugin {self.name!r}: deciders.{stage} plugin not found: {ref!r}")
            if not isinstance(plugin, Decider):
                raise ConfigError(f"plugin {self.name!r}: deciders.{stage}: plugin {ref!r} ({getattr(plugin, 'type_name', '?')}) is not a decider")
            self.deciders[stage] = plugin

    def check_profiles(self, names: Sequence[str]) -> None:
        mine = self.profiles
        if mine["decode"] not in names:
            raise ConfigError(f"{self.type_name} {self.name!r} needs a scheduling profile named {mine['decode']!r} (its decode profile)")
        for stage, ref in self.decider_names.items():
            if mine[stage] not in names:
                raise ConfigError(f"{self.type_name} {self.name!r}: deciders.{stage} is set but there is no profile named {mine[stage]!r}")
        unused = [n for n in names if n not in mine.values()]
        if unused:
            raise ConfigError(f"{self.type_name} {self.name!r} never runs profile(s) {', '.join(unused)}; "
                              f"its profiles are decode={mine['decode']!r}, prefill={mine['prefill']!r}, encode={mine['encode']!r}")
        if self.stage_order == DECODE_FIRST and mine["prefill"] in names and "prefill" not in self.decider_names:
            _log.warning("No deciders.prefill configured: P/D disaggregation disabled, the prefill profile never runs", plugin=self.name)

    # -- scheduling -------------------------------------------------------------------------------
    def pick_profiles(self, state: CycleState, request: LLMRequest, profiles: Mapping[str, SchedulerProfile],
                      results: Mapping[str, ProfileRunResult]) -> list[SchedulerProfile]:
        cycle: _Cycle | None = state.read(self._key)
        if cycle is None:
            cycle = _Cycle()
            state.write(self._key, cycle)
        if cycle.done:
            return []
        nxt = self._next_decode_first(state, request, profiles, results, cycle) if self.stage_order == DECODE_FIRST \
            else self._next_prefill_first(state, request, profiles, results, cycle)
        if nxt is None:
            cycle.done = True
            self._record(state, request, results, cycle)
            return []
        state.write(STAGE_KEY, nxt)
        return [profiles[self.profiles[nxt]]]

    def _pending(self, stage: str, profiles: Mapping[str, SchedulerProfile], results: Mapping[str, ProfileRunResult], cycle: _Cycle) -> bool:
        name = self.profiles[stage]
        return name in profiles and name not in results and stage not in cycle.skipped

    def _ask(self, stage: str, state: CycleState, request: LLMRequest, decode: Endpoint | None, cycle: _Cycle) -> bool:
        decider = self.deciders.get(stage)
        if decider is None:
            cycle.skipped.add(stage)
            return False
        decision = decider.decide(state, request, decode)
        cycle.decided[stage] = decision
        if not decision.disaggregate:
            cycle.skipped.add(stage)  # asked once per request
        return decision.disaggregate

    def _next_decode_first(self, state, request, profiles, results, cycle) -> str | None:
        decode_name = self.profiles["decode"]
        if decode_name not in results:
            return "decode" if decode_name in profiles else None
        decode = _first(results.get(decode_name))
        if decode is None:
            return None
        for stage in ("encode", "prefill"):
            if self._pending(stage, profiles, results, cycle) and self._ask(stage, state, request, decode, cycle):
                state.write(PEER_ENDPOINT_KEY, decode)
                return stage
        return None

    def _next_prefill_first(self, state, request, profiles, results, cycle) -> str | None:
        if self.profiles["decode"] in results:
            return None
        if self._pending("prefill", profiles, results, cycle):
            return "prefill"  # no decider in prefill-first order: prefill runs whenever its profile exists
        if self._pending("encode", profiles, results, cycle) and self._ask("encode", state, request, None, cycle):
            return "encode"
        if self.profiles["decode"] not in profiles:
            return None
        prefill = _first(results.get(self.profiles["prefill"]))
        if prefill is not None:
            state.write(PEER_ENDPOINT_KEY, prefill)
        return "decode"

    def _used(self, stage: str, results: Mapping[str, ProfileRunResult]) -> bool:
        return _first(results.get(self.profiles[stage])) is not None

    def _decision(self, results: Mapping[str, ProfileRunResult], cycle: _Cycle) -> str:
        return decision_type(self._used("encode", results), self._used("prefill", results))

    def _record(self, state: CycleState, request: LLMRequest, results: Mapping[str, ProfileRunResult], cycle: _Cycle) -> None:
        decode = _first(results.get(self.profiles["decode"]))
        if decode is None:
            return  # the request fails; no routing decision was made
        decision = self._decision(results, cycle)
        self.metrics.record(self.metric_kind, self.name, self.type_name, request.target_model, decision)
        note: dict[str, Any] = {"handler": self.name, "decision": decision, "decode": decode.hostport}
        for stage in ("prefill", "encode"):
            run = results.get(self.profiles[stage])
            picked = _first(run)
            if picked is not None:
                note[stage] = picked.hostport
            elif run is not None:  # the stage's profile ran and found nothing: the request is served without it
                note[f"{stage}_failed"] = run.error or "no endpoint picked"
            d = cycle.decided.get(stage)
            if d is not None:
                decider = self.deciders[stage]
                note[f"{stage}_decider"] = {"name": decider.name, "disaggregate": d.disaggregate, "reason": d.reason, **d.details}
        if self.stage_order != DECODE_FIRST:
            note["stage_order"] = self.stage_order
        state.notes[NOTE_KEY] = note

    def process_results(self, state: CycleState, request: LLMRequest, results: Mapping[str, ProfileRunResult]) -> SchedulingResult:
        decode_name = self.profiles["decode"]
        decode = results.get(decode_name)
        if decode is None or not decode.targets:
            failed = decode or ProfileRunResult(profile=decode_name, targets=[], candidates=[])
            why = f": {failed.error}" if failed.error else ""
            failed.error = f"failed to find available decode workers{why}"
            return SchedulingResult(decode_name, {**results, decode_name: failed}, stages={"decode": decode_name})
        out = {decode_name: decode}
        stages = {"decode": decode_name}
        for stage in ("prefill", "encode"):
            name = self.profiles[stage]
            if _first(results.get(name)) is not None:
                out[name] = results[name]
                stages[stage] = name
        return SchedulingResult(decode_name, out, stages=stages)

    # -- PreRequest: tell the decode pod's sidecar where the other stages run ---------------------
    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        write_stage_headers(result, self.profiles["prefill"], self.profiles["encode"])


def write_stage_headers(result: SchedulingResult, prefill_profile: str, encode_profile: str) -> None:
    prefill = _first(result.profile_results.get(prefill_profile))
    if prefill is not None:
        result.request_headers[PREFILL_HEADER] = prefill.hostport
    encode = result.profile_results.get(encode_profile)
    if encode is not None and encode.targets:
        result.request_headers[ENCODERS_HEADER] = ",".join(e.hostport for e in encode.targets)


def _first(run: ProfileRunResult | None) -> Endpoint | None:
    return run.targets[0] if run is not None and run.targets else None


# -- the deprecated pd-profile-handler -----------------------------------------------------------


class ThresholdDecider:
    """pd-profile-handler's built-in rule of llm-d v0.2–v0.4: prefill remotely unless the uncached prompt is shorter than `threshold` characters (0 = always)."""

    type_name = "pd-profile-handler-threshold"

    def __init__(self, name: str, threshold: int) -> None:
        self.name, self.threshold = name, threshold

    def decide(self, state: CycleState, request: LLMRequest, decode: Endpoint | None) -> Decision:
        if self.threshold == 0:
            return Decision(True, "threshold 0: always disaggregate (pd-profile-handler v0.2-v0.4)")
        chars = len(request.prompt_text) or request.prompt_tokens * 4
        cached = (cached_tokens(state, decode) or 0) * 4 if decode is not None else 0
        uncached = max(0, chars - cached)
        if uncached < self.threshold:
            return Decision(False, f"uncached prompt {uncached} chars < threshold {self.threshold}")
        return Decision(True, f"uncached prompt {uncached} chars >= threshold {self.threshold}")


class PdProfileHandler(DisaggProfileHandler):
    """Deprecated since llm-d v0.7: decode, then prefill if the decider agrees; `pd_decision_total`."""

    type_name = "pd-profile-handler"
    metric_kind = "pd"

    def __init__(self, name: str, metrics: DisaggMetrics, *, profiles: Mapping[str, str], decider: str, explicit_decider: bool,
                 threshold: int | None, primary_port: int | None) -> None:
        super().__init__(name, metrics, profiles=profiles, deciders={"prefill": decider})
        self.explicit_decider = explicit_decider
        self.threshold = threshold
        self.primary_port = primary_port

    def bind_plugins(self, instances: Mapping[str, Any]) -> None:
        if self.threshold is None and not self.explicit_decider and self.decider_names["prefill"] not in instances:
            self.threshold = 0  # a v0.2–v0.4 config: no decider anywhere, the threshold defaulted to 0
            _log.warning("pd-profile-handler without a decider plugin: using the v0.2-v0.4 rule (threshold 0 = always disaggregate)",
                         plugin=self.name)
        if self.threshold is not None:
            self.deciders = {"prefill": ThresholdDecider(f"{self.name}/threshold", self.threshold)}
            return
        super().bind_plugins(instances)

    def check_profiles(self, names: Sequence[str]) -> None:
        mine = self.profiles
        if mine["decode"] not in names:
            raise ConfigError(f"pd-profile-handler {self.name!r} needs a scheduling profile named {mine['decode']!r}")
        unused = [n for n in names if n not in (mine["decode"], mine["prefill"])]
        if unused:
            raise ConfigError(f"pd-profile-handler {self.name!r} never runs profile(s) {', '.join(unused)}; "
                              f"its profiles are decodeProfile={mine['decode']!r}, prefillProfile={mine['prefill']!r}")

    def _decision(self, results: Mapping[str, ProfileRunResult], cycle: _Cycle) -> str:
        d = cycle.decided.get("prefill")  # llm-d counts what the decider said
        return PREFILL_DECODE if d is not None and d.disaggregate else DECODE_ONLY

    def process_results(self, state: CycleState, request: LLMRequest, results: Mapping[str, ProfileRunResult]) -> SchedulingResult:
        result = super().process_results(state, request, results)
        if self.primary_port is not None and result.primary.targets:
            run = result.primary
            result.request_headers[DATA_PARALLEL_HEADER] = run.targets[0].hostport
            rewritten = dataclasses.replace(run, targets=[dataclasses.replace(e, port=self.primary_port) for e in run.targets])
            result.profile_results[result.primary_profile] = rewritten
        return result


# -- factories -----------------------------------------------------------------------------------


def _string(name: str, where: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ConfigError(f"plugin {name!r}: {where} must be a string, got {v!r}")
    return v


LEGACY_FIELDS = {
    "decodeProfile": ("profiles", "decode"),
    "prefillProfile": ("profiles", "prefill"),
    "encodeProfile": ("profiles", "encode"),
    "prefillDeciderPluginName": ("deciders", "prefill"),
    "encodeDeciderPluginName": ("deciders", "encode"),
    "deciderPluginName": ("deciders", "prefill"),  # pd-profile-handler's name for it; lower priority
}


@register("disagg-profile-handler")
def _disagg(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> DisaggProfileHandler:
    nested = {"stageOrder", "profiles", "deciders"}
    legacy = [k for k in parameters if k in LEGACY_FIELDS]
    if legacy and set(parameters) & {"profiles", "deciders"}:
        raise ConfigError(f"plugin {name!r}: use one format exclusively: either nested profiles/deciders or the deprecated "
                          f"flat fields ({', '.join(legacy)})")
    reject_unknown(name, parameters, nested | set(LEGACY_FIELDS))
    sections: dict[str, dict[str, str]] = {"profiles": {}, "deciders": {}}
    for section, allowed in (("profiles", ("decode", "prefill", "encode")), ("deciders", ("prefill", "encode"))):
        raw = parameters.get(section) or {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"plugin {name!r}: {section} must be a map of {', '.join(allowed)}")
        for k, v in raw.items():
            if k not in allowed:
                raise ConfigError(f"plugin {name!r}: {section}.{k}: unknown field; expected {', '.join(allowed)}")
            sections[section][k] = _string(name, f"{section}.{k}", v)
    for k in sorted(legacy, key=lambda f: f == "deciderPluginName"):  # deciderPluginName only fills a gap
        section, stage = LEGACY_FIELDS[k]
        if k == "deciderPluginName" and sections[section].get(stage):
            continue
        _log.warning(f"Deprecated parameter {k!r}, use '{section}.{stage}' instead", plugin=name)
        sections[section][stage] = _string(name, k, parameters[k])
    order = parse_stage_order(parameters.get("stageOrder"))
    if order == PREFILL_FIRST and sections["deciders"].get("prefill"):
        raise ConfigError(f"plugin {name!r}: prefill decider is not supported in {PREFILL_FIRST} stage order")
    return DisaggProfileHandler(name, disagg_metrics(ctx), stage_order=order,
                                profiles={k: v for k, v in sections["profiles"].items() if v}, deciders=sections["deciders"])


@register("pd-profile-handler")
def _pd(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> PdProfileHandler:
    reject_unknown(name, parameters, ("decodeProfile", "prefillProfile", "prefixPluginType", "prefixPluginName", "primaryPort",
                                      "deciderPluginName", "prefixMatchInfoProducerName", "threshold", "hashBlockSize"))
    _log.warning("Deprecated: pd-profile-handler is deprecated, use disagg-profile-handler instead", plugin=name)
    for k in ("prefixPluginType", "prefixPluginName", "prefixMatchInfoProducerName"):
        if k in parameters:
            _string(name, k, parameters[k])
            _log.info(f"{k} names where prefix-match data comes from; this EPP reads it from the configured prefix-cache producer",
                      plugin=name)
    threshold = parameters.get("threshold")
    if threshold is not None and (not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 0):
        raise ConfigError(f"plugin {name!r}: threshold must be an integer >= 0, got {threshold!r}")
    block = parameters.get("hashBlockSize")
    if block is not None and (not isinstance(block, int) or isinstance(block, bool) or block < 1):
        raise ConfigError(f"plugin {name!r}: hashBlockSize must be a positive integer, got {block!r}")
    legacy = [k for k in ("threshold", "hashBlockSize") if k in parameters]
    if legacy:
        if "deciderPluginName" in parameters:
            raise ConfigError(f"plugin {name!r}: {' and '.join(legacy)} (llm-d v0.2-v0.4) cannot be combined with deciderPluginName (v0.5+)")
        _log.warning(f"Deprecated parameter(s) {', '.join(legacy)} (llm-d v0.2-v0.4): use a prefix-based-pd-decider", plugin=name)
        threshold = threshold or 0
    port = parameters.get("primaryPort", 0)
    if not isinstance(port, int) or isinstance(port, bool) or not (port == 0 or 1 <= port <= 65535):
        raise ConfigError(f"plugin {name!r}: invalid primaryPort: must be between 1 and 65535, got {port!r}")
    if port:
        _log.warning("Deprecated: primaryPort not needed with Istio >= 1.28.1", plugin=name)
    decider = _string(name, "deciderPluginName", parameters.get("deciderPluginName", "prefix-based-pd-decider"))
    return PdProfileHandler(
        name, disagg_metrics(ctx),
        profiles={"decode": _string(name, "decodeProfile", parameters.get("decodeProfile", "decode")),
                  "prefill": _string(name, "prefillProfile", parameters.get("prefillProfile", "prefill"))},
        decider=decider, explicit_decider="deciderPluginName" in parameters, threshold=threshold, primary_port=port or None,
    )
