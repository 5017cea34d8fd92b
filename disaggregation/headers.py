"""disagg-headers-handler and prefill-header-handler: llm-d's deprecated PreRequest header writers.

disagg-profile-handler writes `x-prefiller-host-port` and `x-encoder-hosts-ports` itself; these
remain so that configs written for llm-d v0.2–v0.8 (which list them) load and behave the same.
"""

from __future__ import annotations

from typing import Any, Mapping

from disaggregation.profile_handler import write_stage_headers
from epp.observability.logging import get_logger
from epp.scheduling.framework import ConfigError, LLMRequest, SchedulingResult
from epp.scheduling.registry import PluginContext, register, reject_unknown

_log = get_logger("epp.disaggregation")


class HeadersHandler:
    def __init__(self, type_name: str, name: str, prefill_profile: str, encode_profile: str) -> None:
        self.type_name, self.name = type_name, name
        self.prefill_profile, self.encode_profile = prefill_profile, encode_profile

    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        write_stage_headers(result, self.prefill_profile, self.encode_profile)


def _factory(type_name: str):
    def make(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> HeadersHandler:
        reject_unknown(name, parameters, ("prefillProfile", "encodeProfile"))
        profiles = {k: parameters.get(k, default) for k, default in (("prefillProfile", "prefill"), ("encodeProfile", "encode"))}
        for k, v in profiles.items():
            if not isinstance(v, str) or not v:
                raise ConfigError(f"plugin {name!r}: {k} must be a profile name, got {v!r}")
        _log.warning(f"Deprecated: {type_name} is deprecated (planned removal in llm-d v0.11); "
                     "disagg-profile-handler writes the prefill and encode headers itself", plugin=name)
        return HeadersHandler(type_name, name, profiles["prefillProfile"], profiles["encodeProfile"])

    return make


register("disagg-headers-handler")(_factory("disagg-headers-handler"))
register("prefill-header-handler")(_factory("prefill-header-handler"))
