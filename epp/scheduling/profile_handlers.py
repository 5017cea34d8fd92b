"""Profile handlers: decide which scheduling profiles run and which result routes the request."""

from __future__ import annotations

from typing import Any, Mapping

from epp.scheduling.framework import (
    ConfigError,
    CycleState,
    LLMRequest,
    ProfileRunResult,
    SchedulerProfile,
    SchedulingResult,
)
from epp.scheduling.registry import PluginContext, register


class SingleProfileHandler:
    """Runs the one configured profile once; its result is the primary result."""

    type_name = "single-profile-handler"

    def __init__(self, name: str) -> None:
        self.name = name

    def pick_profiles(
        self,
        state: CycleState,
        request: LLMRequest,
        profiles: Mapping[str, SchedulerProfile],
        results: Mapping[str, ProfileRunResult],
    ) -> list[SchedulerProfile]:
        if results:
            return []
        if len(profiles) != 1:
            raise ConfigError(f"single-profile-handler needs exactly one profile, found {sorted(profiles)}")
        return list(profiles.values())

    def process_results(
        self, state: CycleState, request: LLMRequest, results: Mapping[str, ProfileRunResult]
    ) -> SchedulingResult:
        (name,) = results
        return SchedulingResult(primary_profile=name, profile_results=dict(results))


@register("single-profile-handler")
def _single(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> SingleProfileHandler:
    return SingleProfileHandler(name)
