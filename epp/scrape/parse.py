"""Prometheus text → EndpointMetrics: vLLM names summed over `engine`, and the P/D proxy's own series."""

from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families

from epp.datastore.endpoint import EndpointMetrics, TransferProfile

MAX_PEERS = 1024  # prefill peers one decode endpoint may publish link profiles for


def parse_metrics(text: str, now: float | None = None) -> EndpointMetrics:
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    profile: dict[int, float] = {}
    links: dict[str, dict[int, tuple[float, str]]] = {}
    block_size = num_blocks = None
    block_tokens = block_bytes = None
    backend = ""
    lora: tuple[float, dict] | None = None
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            name = s.name
            if name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc",
                        "pdproxy_in_flight_requests", "pdproxy_prefill_tokens_per_second", "pdproxy_decode_seconds_per_token"):
                sums[name] = sums.get(name, 0.0) + s.value
                counts[name] = counts.get(name, 0) + 1
            elif name == "vllm:cache_config_info":
                try:
                    block_size = int(s.labels.get("block_size", "")) if s.labels.get("block_size") else block_size
                    num_blocks = int(s.labels.get("num_gpu_blocks", "")) if s.labels.get("num_gpu_blocks") else num_blocks
                except ValueError:
                    pass
            elif name == "pdproxy_kv_transfer_profile_seconds":
                try:
                    peer = s.labels.get("prefill")  # a decode sidecar's profile of the link from this prefill peer
                    if peer:
                        if peer in links or len(links) < MAX_PEERS:
                            links.setdefault(peer, {})[int(s.labels["blocks"])] = (s.value, s.labels.get("kv_backend", ""))
                    else:
                        profile[int(s.labels["blocks"])] = s.value
                        backend = s.labels.get("kv_backend", backend)
                except (KeyError, ValueError):
                    pass
            elif name == "vllm:lora_requests_info" and (lora is None or s.value >= lora[0]):
                lora = (s.value, s.labels)  # the value is a timestamp: the newest series wins
            elif name == "pdproxy_kv_block_tokens":
                block_tokens = int(s.value)
            elif name == "pdproxy_kv_block_bytes":
                block_bytes = int(s.value)

    def mean(name: str) -> float | None:
        return sums[name] / counts[name] if name in sums and counts[name] else None

    usage = mean("vllm:kv_cache_usage_perc")
    if usage is None:
        usage = mean("vllm:gpu_cache_usage_perc")  # vLLM before 0.10 spelled it this way
    transfer = None
    if profile:
        blocks = tuple(sorted(profile))
        transfer = TransferProfile(blocks, tuple(profile[b] for b in blocks), block_tokens or block_size or 16, block_bytes or 0, backend)
    bt = block_tokens or block_size or 16
    link_profiles = None
    if links:
        link_profiles = {}
        for peer, pts in links.items():
            blocks = tuple(sorted(pts))
            link_profiles[peer] = TransferProfile(blocks, tuple(pts[b][0] for b in blocks), bt, block_bytes or 0, pts[blocks[0]][1])
    running = waiting = max_loras = None
    if lora is not None:
        running, waiting = (frozenset(a for a in lora[1].get(k, "").split(",") if a) for k in ("running_lora_adapters", "waiting_lora_adapters"))
        try:
            max_loras = int(lora[1].get("max_lora", ""))
        except ValueError:
            max_loras = 0
    return EndpointMetrics(
        waiting=sums.get("vllm:num_requests_waiting"),
        running=sums.get("vllm:num_requests_running"),
        kv_cache_usage=usage,
        block_size=block_size,
        num_gpu_blocks=num_blocks,
        proxy_in_flight=sums.get("pdproxy_in_flight_requests"),
        prefill_tokens_per_second=mean("pdproxy_prefill_tokens_per_second"),
        decode_seconds_per_token=mean("pdproxy_decode_seconds_per_token"),
        transfer_profile=transfer,
        link_profiles=link_profiles,
        running_loras=running,
        waiting_loras=waiting,
        max_loras=max_loras,
        updated_at=time.monotonic() if now is None else now,
    )
