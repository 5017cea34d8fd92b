"""The `endpoint-health` config plugin: tunes (or turns off) endpoint health for the whole pool.

Listed under `plugins` only, never in a scheduling profile: it decides which endpoints any profile
may see, before the profiles' filters run. Without it the EPP runs endpoint health with the
defaults; `parameters: {enabled: false}` turns it off.
"""

from __future__ import annotations

from typing import Any, Mapping

from epp.endpoint_health.monitor import HealthMonitor
from epp.endpoint_health.policy import parse_policy
from epp.scheduling.registry import PluginContext, register


@register("endpoint-health")
def _factory(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> HealthMonitor:
    return HealthMonitor(name, parse_policy(name, parameters))
