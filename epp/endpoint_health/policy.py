"""The `endpoint-health` parameters: Envoy's outlier-detection fields, readiness probing, response deadlines.

Field names follow Envoy's `OutlierDetection` (camelCase, as GIE configs spell parameters) so that
people who tune Envoy clusters recognise them; durations are Go durations. Every field is checked
and an unknown one is an error that names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from epp.scheduling.framework import ConfigError
from epp.scheduling.registry import reject_unknown
from epp.util.duration import parse_duration


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    """Ejection on passive outcomes, with Envoy's meaning and defaults (except where noted)."""

    consecutive_5xx: int = 5
    # Envoy's default is 5 with enforcement 0%: on here, because a P/D pair that cannot reach its
    # decode answers 503 in a millisecond and would otherwise win every pick of a load-aware scorer.
    consecutive_gateway_failure: int = 2
    enforcing_consecutive_5xx: int = 100
    enforcing_consecutive_gateway_failure: int = 100
    interval: float = 10.0  # success-rate / failure-percentage sweep, and ejection-multiplier decay
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: int = 10
    success_rate_minimum_hosts: int = 5
    success_rate_request_volume: int = 100
    success_rate_stdev_factor: int = 1900
    enforcing_success_rate: int = 100
    failure_percentage_threshold: int = 85
    failure_percentage_minimum_hosts: int = 5
    failure_percentage_request_volume: int = 50
    enforcing_failure_percentage: int = 0

    def ejection_time(self, multiplier: int) -> float:
        """base × multiplier, capped at max(base, maxEjectionTime) as Envoy does."""
        return min(self.base_ejection_time * max(1, multiplier), max(self.base_ejection_time, self.max_ejection_time))


@dataclass(frozen=True, slots=True)
class ReadinessPolicy:
    """Active checks: GET `path` on each endpoint; 200 (or 404: no such route) is ready."""

    enabled: bool = True
    path: str = "/health"
    interval: float = 1.0
    timeout: float = 1.0
    # Timeouts and odd errors must repeat this often; a refused connection or a 5xx answer counts at once.
    unhealthy_threshold: int = 2
    healthy_threshold: int = 1


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    enabled: bool = True
    outlier: OutlierPolicy = field(default_factory=OutlierPolicy)
    readiness: ReadinessPolicy = field(default_factory=ReadinessPolicy)
    # A streamed response must start within this; a non-streamed one (whose headers come with the
    # whole answer) gets this plus perOutputTokenTimeout for each output token it may produce.
    first_byte_timeout: float = 15.0
    per_output_token_timeout: float = 0.1
    default_output_tokens: int = 1024  # when a non-streamed request does not say max_tokens
    stream_idle_timeout: float = 15.0  # a started response that sends nothing for this long is stalled
    # Envoy's healthy_panic_threshold: below this % of admissible endpoints, route to all of them
    # rather than refuse (0 disables panic: with none admissible the EPP answers 503).
    panic_threshold: float = 50.0

    def first_byte_deadline(self, stream: bool, max_tokens: int | None) -> float:
        if stream:
            return self.first_byte_timeout
        return self.first_byte_timeout + (max_tokens or self.default_output_tokens) * self.per_output_token_timeout


# parameter name -> (dataclass field, kind)
_OUTLIER = {
    "consecutive5xx": ("consecutive_5xx", "count"),
    "consecutiveGatewayFailure": ("consecutive_gateway_failure", "count"),
    "enforcingConsecutive5xx": ("enforcing_consecutive_5xx", "percent"),
    "enforcingConsecutiveGatewayFailure": ("enforcing_consecutive_gateway_failure", "percent"),
    "interval": ("interval", "duration"),
    "baseEjectionTime": ("base_ejection_time", "duration"),
    "maxEjectionTime": ("max_ejection_time", "duration"),
    "maxEjectionPercent": ("max_ejection_percent", "percent"),
    "successRateMinimumHosts": ("success_rate_minimum_hosts", "count"),
    "successRateRequestVolume": ("success_rate_request_volume", "count"),
    "successRateStdevFactor": ("success_rate_stdev_factor", "count"),
    "enforcingSuccessRate": ("enforcing_success_rate", "percent"),
    "failurePercentageThreshold": ("failure_percentage_threshold", "percent"),
    "failurePercentageMinimumHosts": ("failure_percentage_minimum_hosts", "count"),
    "failurePercentageRequestVolume": ("failure_percentage_request_volume", "count"),
    "enforcingFailurePercentage": ("enforcing_failure_percentage", "percent"),
}
_READINESS = {
    "enabled": ("enabled", "bool"),
    "path": ("path", "path"),
    "interval": ("interval", "duration"),
    "timeout": ("timeout", "duration"),
    "unhealthyThreshold": ("unhealthy_threshold", "count"),
    "healthyThreshold": ("healthy_threshold", "count"),
}
_TOP = {
    "enabled": ("enabled", "bool"),
    "firstByteTimeout": ("first_byte_timeout", "duration"),
    "perOutputTokenTimeout": ("per_output_token_timeout", "duration0"),
    "defaultOutputTokens": ("default_output_tokens", "count"),
    "streamIdleTimeout": ("stream_idle_timeout", "duration"),
    "panicThreshold": ("panic_threshold", "percent"),
}


def _value(plugin: str, where: str, kind: str, v: Any) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"plugin {plugin!r}: {where}: must be {expected}, got {v!r}")

    if kind == "bool":
        if not isinstance(v, bool):
            raise bad("true or false")
        return v
    if kind == "path":
        if not isinstance(v, str) or not v.startswith("/"):
            raise bad("a URL path starting with /")
        return v
    if kind in ("duration", "duration0"):
        try:
            seconds = parse_duration(v)
        except ValueError as e:
            raise ConfigError(f"plugin {plugin!r}: {where}: {e}") from None
        if seconds <= 0 and kind == "duration":
            raise bad("a positive duration such as 500ms or 30s")
        return seconds
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise bad("a number")
    if kind == "percent":
        if not 0 <= v <= 100:
            raise bad("a percentage from 0 to 100")
        return v
    if int(v) != v or v < 1:  # count
        raise bad("a positive integer")
    return int(v)


def _section(plugin: str, prefix: str, data: Any, spec: Mapping[str, tuple[str, str]], cls: type, skip: tuple[str, ...] = ()) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"plugin {plugin!r}: {prefix or 'parameters'}: must be a map")
    reject_unknown(plugin, data, (*spec, *skip), where=prefix)
    values = {}
    for key, v in data.items():
        if key in skip:
            continue
        attr, kind = spec[key]
        values[attr] = _value(plugin, f"{prefix}{key}", kind, v)
    return cls(**values)


def parse_policy(plugin: str, parameters: Mapping[str, Any]) -> HealthPolicy:
    """HealthPolicy from the plugin's `parameters` (ConfigError naming the field otherwise)."""
    outlier = _section(plugin, "outlierDetection.", parameters.get("outlierDetection"), _OUTLIER, OutlierPolicy)
    readiness = _section(plugin, "readiness.", parameters.get("readiness"), _READINESS, ReadinessPolicy)
    top = _section(plugin, "", parameters, _TOP, dict, skip=("outlierDetection", "readiness"))
    return HealthPolicy(outlier=outlier, readiness=readiness, **top)
