"""Endpoint health: passive outcomes, readiness probes and a watchdog feed Envoy-style outlier ejection."""

from epp.endpoint_health.monitor import Admission, HealthMonitor
from epp.endpoint_health.policy import HealthPolicy, OutlierPolicy, ReadinessPolicy, parse_policy

__all__ = ["Admission", "HealthMonitor", "HealthPolicy", "OutlierPolicy", "ReadinessPolicy", "parse_policy"]
