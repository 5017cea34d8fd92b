"""The serving benchmark: a workload through the gateway, latency percentiles, plots, profile comparisons."""
