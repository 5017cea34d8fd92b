"""Logs (structlog JSON), Prometheus metrics and the "Scoring decision" event."""
