"""What the EPP knows about one endpoint's health: outcomes, ejection, readiness, the half-open trial."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

HEALTHY, EJECTED, UNREADY, HALF_OPEN = "healthy", "ejected", "unready", "half_open"
STATES = (HEALTHY, EJECTED, UNREADY, HALF_OPEN)

# Ejection reasons (a bounded set: they label a metric).
CONSECUTIVE_5XX = "consecutive_5xx"
CONSECUTIVE_GATEWAY_FAILURE = "consecutive_gateway_failure"
SUCCESS_RATE = "success_rate"
FAILURE_PERCENTAGE = "failure_percentage"
TRIAL_FAILED = "half_open_trial_failed"
EJECTION_REASONS = (CONSECUTIVE_5XX, CONSECUTIVE_GATEWAY_FAILURE, SUCCESS_RATE, FAILURE_PERCENTAGE, TRIAL_FAILED)


@dataclass(slots=True, eq=False)
class EndpointHealth:
    key: str
    hostport: str
    # passive: Envoy's consecutive counters, this interval's tallies, and totals by outcome kind
    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    interval_success: int = 0
    interval_failure: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    last_failure: str = ""
    last_failure_at: float = 0.0
    last_request_failed: bool = False  # the most recent request that ended with a verdict on the endpoint failed
    ttfb_ewma: float | None = None  # seconds to the response's first byte, successes only
    # outlier ejection
    ejected_until: float = 0.0  # monotonic deadline; 0 = not ejected
    ejection_reason: str = ""
    ejection_detail: str = ""
    multiplier: int = 0  # Envoy's ejection multiplier: grows per ejection, decays per healthy interval
    ejections: dict[str, int] = field(default_factory=dict)  # reason -> count
    unready_while_ejected: bool = False
    # readiness (active checks)
    ready: bool | None = None  # None until the first probe
    probe_failures: int = 0
    probe_passes: int = 0
    readiness_detail: str = ""
    instances: dict[str, tuple[int, int]] = field(default_factory=dict)  # role -> (up, total), from the endpoint's /health
    # half-open: after an ejection or unreadiness ends, one trial request at a time until one succeeds
    half_open: bool = False
    half_open_since: float = 0.0
    trial: int | None = None

    def state(self, now: float) -> str:
        if self.ejected_until and now < self.ejected_until:
            return EJECTED
        if self.ready is False:
            return UNREADY
        if self.half_open or self.ejected_until:
            return HALF_OPEN  # an elapsed ejection becomes half-open at the next admission
        return HEALTHY

    def snapshot(self, now: float) -> dict[str, Any]:
        """A plain view for the admin API, metrics and logs."""
        out: dict[str, Any] = {
            "endpoint": self.key,
            "hostport": self.hostport,
            "state": self.state(now),
            "ready": self.ready,
            "readiness": self.readiness_detail,
            "consecutive_5xx": self.consecutive_5xx,
            "consecutive_gateway_failures": self.consecutive_gateway,
            "outcomes": dict(self.outcomes),
            "ejections": dict(self.ejections),
            "multiplier": self.multiplier,
        }
        if self.ejected_until and now < self.ejected_until:
            out["ejection_reason"] = self.ejection_reason
            out["ejection_detail"] = self.ejection_detail
            out["ejected_for_seconds"] = round(self.ejected_until - now, 3)
        if self.last_failure:
            out["last_failure"] = self.last_failure
            out["last_failure_age_seconds"] = round(now - self.last_failure_at, 3)
        if self.ttfb_ewma is not None:
            out["ttfb_seconds"] = round(self.ttfb_ewma, 6)
        if self.instances:
            out["instances"] = {role: {"up": up, "total": total} for role, (up, total) in self.instances.items()}
        if self.half_open:
            out["trial_in_flight"] = self.trial is not None
        return out
