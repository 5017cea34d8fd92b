"""What the EPP knows about one backend endpoint (a P/D proxy or a model server).

`Endpoint` identity (name, address, port, labels) comes from discovery and is immutable once
published; the live view (`metrics`) is swapped atomically by the scraper, so schedulers read
a consistent snapshot without locks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping

KV_BACKEND_LABEL = "llm-d.ai/kv-backend"
ROLE_LABEL = "llm-d.ai/role"
# llm-d's `llm-d.ai/role` values that can serve a stage (`both` is the deprecated `prefill-decode`).
DECODE_ROLES = frozenset({"decode", "prefill-decode", "both", "encode-prefill-decode"})
PREFILL_ROLES = frozenset({"prefill", "encode-prefill", "prefill-decode", "both", "encode-prefill-decode"})
ENCODE_ROLES = frozenset({"encode", "encode-prefill", "encode-prefill-decode"})


def can_prefill(endpoint: "Endpoint") -> bool:
    """What llm-d's prefill-filter keeps: a prefill-capable role (unlabelled pods are decode-only)."""
    return endpoint.labels.get(ROLE_LABEL) in PREFILL_ROLES


def can_decode(endpoint: "Endpoint") -> bool:
    """What llm-d's decode-filter keeps: a decode-capable role, or no role label at all."""
    role = endpoint.labels.get(ROLE_LABEL)
    return role is None or role in DECODE_ROLES


@dataclass(frozen=True, slots=True)
class TransferProfile:
    """Measured KV-transfer time as a function of KV block count (the Llumnix method).

    `blocks` is strictly increasing; `seconds[i]` is the measured transfer time of `blocks[i]`
    blocks. `block_tokens` is the number of tokens one block holds.
    """

    blocks: tuple[int, ...]
    seconds: tuple[float, ...]
    block_tokens: int = 16
    block_bytes: int = 0
    backend: str = ""

    def seconds_for_tokens(self, tokens: int) -> float:
        """Estimated transfer time of a prompt: tokens → blocks → interpolated between measured points.

        Below the smallest measurement the smallest time holds (latency floor); above the largest,
        the last segment's slope extends it.
        """
        blocks = max(1, -(-tokens // max(1, self.block_tokens)))
        xs, ys = self.blocks, self.seconds
        if len(xs) == 1 or blocks <= xs[0]:
            return ys[0]
        for i in range(1, len(xs)):
            if blocks <= xs[i]:
                x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
                return y0 + (y1 - y0) * (blocks - x0) / (x1 - x0)
        x0, x1, y0, y1 = xs[-2], xs[-1], ys[-2], ys[-1]
        return y1 + (y1 - y0) / (x1 - x0) * (blocks - x1)


@dataclass(frozen=True, slots=True)
class EndpointMetrics:
    """One scrape of an endpoint's /metrics. Fields are None when the endpoint does not export them."""

    waiting: float | None = None  # vllm:num_requests_waiting (summed over engines)
    running: float | None = None  # vllm:num_requests_running
    kv_cache_usage: float | None = None  # 0..1, vllm:kv_cache_usage_perc (fallback gpu_cache_usage_perc)
    block_size: int | None = None  # vllm:cache_config_info{block_size}
    num_gpu_blocks: int | None = None
    proxy_in_flight: float | None = None  # the P/D proxy's own in-flight requests
    prefill_tokens_per_second: float | None = None  # measured prefill speed, if exported
    decode_seconds_per_token: float | None = None  # measured inter-token latency, if exported
    transfer_profile: TransferProfile | None = None
    # A decode sidecar's measured profile per prefill peer (peer ip:port -> profile): the live links.
    link_profiles: Mapping[str, TransferProfile] | None = None
    # vllm:lora_requests_info (its latest series): adapters running / waiting, and the adapter slots
    running_loras: frozenset[str] | None = None
    waiting_loras: frozenset[str] | None = None
    max_loras: int | None = None
    updated_at: float = 0.0  # time.monotonic() of the scrape; 0 = never scraped
    error: str | None = None  # last scrape error, if the last attempt failed

    def age(self, now: float | None = None) -> float:
        """Seconds since the last successful scrape (inf when never scraped)."""
        if self.updated_at <= 0:
            return float("inf")
        return (time.monotonic() if now is None else now) - self.updated_at


@dataclass(slots=True, eq=False)
class Endpoint:
    """A schedulable backend. Compared by identity; `key` is stable across updates."""

    name: str
    address: str
    port: int
    labels: Mapping[str, str] = field(default_factory=dict)
    namespace: str = ""
    metrics_url: str | None = None  # defaults to http://address:port/metrics
    metrics: EndpointMetrics = field(default_factory=EndpointMetrics)
    # Computed once: the scheduler reads both for every candidate of every request.
    key: str = field(init=False, repr=False, compare=False)
    hostport: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # `key`: stable identity used by stateful plugins (namespace/name).
        self.key = f"{self.namespace}/{self.name}" if self.namespace else self.name
        # `hostport`: ip:port as Envoy expects it in x-gateway-destination-endpoint (IPv6 bracketed).
        if ":" in self.address and not self.address.startswith("["):
            self.hostport = f"[{self.address}]:{self.port}"
        else:
            self.hostport = f"{self.address}:{self.port}"

    @property
    def kv_backend(self) -> str:
        return self.labels.get(KV_BACKEND_LABEL, "")

    def scrape_url(self) -> str:
        return self.metrics_url or f"http://{self.hostport}/metrics"
