"""Per-endpoint data that producers leave in the CycleState for filters and scorers (llm-d's attributes).

A producer writes under its own instance name, so two producers (say an approximate and a
precise one) never overwrite each other, and a consumer reads the producer it was bound to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from epp.scheduling.framework import CycleState

PREFIX_MATCH_KEY = "PrefixCacheMatchInfo"
IN_FLIGHT_KEY = "InFlightLoad"


@dataclass(frozen=True, slots=True)
class PrefixCacheMatchInfo:
    """How much of this request's prefix an endpoint holds, in blocks of `block_size_tokens`."""

    match_blocks: int
    total_blocks: int
    block_size_tokens: int

    @property
    def cached_tokens(self) -> int:
        return self.match_blocks * self.block_size_tokens


@dataclass(frozen=True, slots=True)
class InFlightLoad:
    """Requests and (uncached) prompt tokens this EPP has sent to an endpoint and not seen finish."""

    requests: int
    tokens: int


def put(state: CycleState, key: str, producer: str, per_endpoint: Mapping[str, object]) -> None:
    by_producer = state.read(key)
    if by_producer is None:
        by_producer = {}
        state.write(key, by_producer)
    by_producer[producer] = per_endpoint


def get(state: CycleState, key: str, producer: str) -> Mapping[str, object] | None:
    """The producer's per-endpoint data for this cycle (endpoint key → value), None when it produced none."""
    return (state.read(key) or {}).get(producer)


def cached_tokens(state: CycleState) -> dict[str, int]:
    """Endpoint key → prompt tokens some prefix producer believes the endpoint has cached (the largest claim)."""
    out: dict[str, int] = {}
    for infos in (state.read(PREFIX_MATCH_KEY) or {}).values():
        for key, info in infos.items():
            n = info.cached_tokens
            if n > out.get(key, 0):
                out[key] = n
    return out
