"""KV-transfer bandwidth profiling, the Llumnix way: transfer time at log-spaced block counts."""

SCHEMA = "inference-epp/kv-transfer-profile/v1"
