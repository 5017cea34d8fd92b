"""Did the decode load the prompt's KV, or compute the prompt itself? vLLM's token-source counters say.

vLLM counts every prompt token by where it came from, on the instance that served it:
`vllm:prompt_tokens_by_source_total{source="local_compute"|"local_cache_hit"|"external_kv_transfer"}`.
A decode that loaded a prompt's KV counts it as `external_kv_transfer` (shared storage moves whole
blocks only, so up to a block's remainder is computed); one that recomputed it counts
`local_compute` — the outputs are the same, so without this check nothing would tell.
Shared storage (ExampleConnector) stores the whole blocks before the prompt's last token, so
1 to `block_size` tokens of every prompt are computed anyway; NIXL moves them all.

The proxy reads the decode's counters on every scrape and attributes the change to the requests
whose first token arrived since the last attribution (the counters move when the prompt is done,
just before the first token). It attributes at a read when no request waits for its first token
on that decode, so that each request's tokens are matched with it; under steady load at least
every few reads, allowing a block per request still in flight. Prompt tokens computed beyond
what each prompt computes anyway were recomputed. The
NIXL connector's own transfer-time histogram (`vllm:nixl_xfer_time_seconds`), when present, gives
the measured KV-transfer times.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from prometheus_client.parser import text_string_to_metric_families

SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")
RATIO_EWMA = 0.3
MAX_DEFERRED = 5  # under steady load, attribute at least every this many reads (allowing for requests in flight)
log = logging.getLogger("pd_proxy.kv_load")


@dataclass
class DecodeCounters:
    """One decode instance's counters at its last read, and what it served since."""

    tokens: dict[str, float] | None = None
    xfer_sum: float | None = None
    xfer_count: float | None = None
    block_size: int = 16
    pending: list[tuple[float, int]] = field(default_factory=list)  # (first token at, prompt tokens)
    in_flight: int = 0  # decode requests without their first token yet
    unmatched: dict[str, float] = field(default_factory=dict)  # counter changes not yet attributed to requests
    deferred: int = 0  # reads since the last attribution


@dataclass
class WindowResult:
    requests: int
    loaded_tokens: float
    computed_tokens: float
    recomputed_tokens: float
    recomputed_requests: int


def read_counters(text: str) -> tuple[dict[str, float], float | None, float | None, int | None]:
    """(prompt tokens by source, NIXL transfer-time sum, its count, block size) summed over engines."""
    tokens: dict[str, float] = {}
    xsum = xcount = None
    block = None
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "vllm:prompt_tokens_by_source_total" and s.labels.get("source") in SOURCES:
                tokens[s.labels["source"]] = tokens.get(s.labels["source"], 0.0) + s.value
            elif s.name == "vllm:nixl_xfer_time_seconds_sum":
                xsum = (xsum or 0.0) + s.value
            elif s.name == "vllm:nixl_xfer_time_seconds_count":
                xcount = (xcount or 0.0) + s.value
            elif s.name == "vllm:cache_config_info" and s.labels.get("block_size", "").isdigit():
                block = int(s.labels["block_size"])
    return tokens, xsum, xcount, block


class KVLoadMonitor:
    """Per decode URL: attributes token-source changes to the requests served, and reports recomputation."""

    def __init__(self, on_window: Callable[[str, WindowResult], None], on_transfer: Callable[[float, int], None]) -> None:
        self.decodes: dict[str, DecodeCounters] = {}
        self.on_window = on_window  # called for every read that saw requests
        self.on_transfer = on_transfer  # (mean seconds per transfer, transfers) from the NIXL histogram

    def _of(self, url: str) -> DecodeCounters:
        return self.decodes.setdefault(url, DecodeCounters())

    def started(self, url: str) -> None:
        self._of(url).in_flight += 1

    def first_token(self, url: str, at: float, prompt_tokens: int) -> None:
        c = self._of(url)
        c.in_flight = max(0, c.in_flight - 1)
        c.pending.append((at, prompt_tokens))

    def abandoned(self, url: str) -> None:
        """A decode request that ended without a first token (error, disconnect)."""
        c = self._of(url)
        c.in_flight = max(0, c.in_flight - 1)

    def absorb(self, url: str, text: str, read_at: float) -> WindowResult | None:
        """The decode's /metrics, fetched starting at `read_at` (monotonic)."""
        c = self._of(url)
        tokens, xsum, xcount, block = read_counters(text)
        if block:
            c.block_size = block
        if xsum is not None and xcount is not None:
            if c.xfer_count is not None and xcount > c.xfer_count:
                n = int(xcount - c.xfer_count)
                self.on_transfer((xsum - (c.xfer_sum or 0.0)) / n, n)
            c.xfer_sum, c.xfer_count = xsum, xcount
        if not tokens:
            c.pending.clear()  # an engine without token-source counters: nothing to check
            return None
        if c.tokens is None:
            c.tokens = tokens
            c.pending = [p for p in c.pending if p[0] > read_at]
            return None
        for s in SOURCES:  # counters that moved, not yet matched with requests
            c.unmatched[s] = c.unmatched.get(s, 0.0) + tokens.get(s, 0.0) - c.tokens.get(s, 0.0)
        c.tokens = tokens
        if c.in_flight and c.deferred < MAX_DEFERRED:
            c.deferred += 1  # a request between its prompt and its first token may be in these counters: match at a quieter read
            return None
        served = [p for p in c.pending if p[0] <= read_at]
        c.pending = [p for p in c.pending if p[0] > read_at]
        delta, c.unmatched, c.deferred = c.unmatched, {}, 0
        if not served and delta.get("local_compute", 0.0) <= 0:
            return None
        b = c.block_size
        # shared storage loads the whole blocks before a prompt's last token, so up to a block of each
        # prompt is computed even when its KV is loaded; a request that has not had its first token
        # yet may already have added as much to the counters
        allowance = sum(t - (t - 1) // b * b for _, t in served) + b * c.in_flight  # 1..b tokens each
        recomputed = max(0.0, delta.get("local_compute", 0.0) - allowance)
        whole = [t for _, t in served if t > b]  # prompts with at least one block to load
        recomputed_requests = 0
        if recomputed >= b and whole:
            if delta.get("external_kv_transfer", 0.0) <= 0:
                recomputed_requests = len(whole)
            else:
                mean_whole = sum((t - 1) // b * b for t in whole) / len(whole)
                recomputed_requests = max(1, min(len(whole), round(recomputed / max(1.0, mean_whole))))
        elif recomputed < b:
            recomputed = 0.0
        result = WindowResult(len(served), delta.get("external_kv_transfer", 0.0), delta.get("local_compute", 0.0), recomputed,
                              recomputed_requests)
        self.on_window(url, result)
        return result
