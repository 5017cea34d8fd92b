"""Sidecar mode: the KV-transfer time of each prefill peer's link into this decode, re-measured as requests go.

Each decode leg that loaded its KV says how long it waited (`x-kv-transfer-seconds`); with the
prompt's block count that is one point on the link's curve. Per peer the last `WINDOW` points are
fitted to `latency + blocks × seconds_per_block` (least squares; through the origin while every
point has the same size) and the fit is published at log-spaced block counts, the shape of a
`kv-bandwidth-profiler` profile, as `pdproxy_kv_transfer_profile_seconds{prefill="host:port"}`.
The EPP reads it as the pair's *live* profile, ahead of any file. A short window is the point: a
link degraded at run time shows within a few requests, not after an average has crept. Points
expire after `max_age` seconds: a link the EPP stopped using because it looked slow is published
no longer, the EPP goes back to its file profile, tries the link again and measures it afresh.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Callable

WINDOW = 8
GRID = (1, 4, 16, 64, 256, 1024, 4096)  # block counts the fit is published at
MAX_PEERS = 256  # bounded by the allowlist anyway; the oldest peer is forgotten past this


class LiveLinkProfiles:
    def __init__(self, block_tokens: int = 16, max_age: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.block_tokens = max(1, block_tokens)
        self.max_age, self.clock = max_age, clock
        self._points: OrderedDict[str, deque[tuple[int, float, float]]] = OrderedDict()

    def observe(self, peer: str, prompt_tokens: int, seconds: float) -> None:
        if prompt_tokens <= 0 or seconds < 0:
            return
        blocks = max(1, -(-prompt_tokens // self.block_tokens))
        pts = self._points.get(peer)
        if pts is None:
            pts = self._points[peer] = deque(maxlen=WINDOW)
            while len(self._points) > MAX_PEERS:
                self._points.popitem(last=False)
        self._points.move_to_end(peer)
        pts.append((blocks, seconds, self.clock()))

    @staticmethod
    def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
        """(latency seconds, seconds per block) of the points; both ≥ 0."""
        n = len(points)
        mx = sum(b for b, _ in points) / n
        my = sum(s for _, s in points) / n
        var = sum((b - mx) ** 2 for b, _ in points)
        if var <= 1e-9 * max(1.0, mx * mx):
            return 0.0, my / mx  # one size only: no way to split latency from bandwidth
        slope = sum((b - mx) * (s - my) for b, s in points) / var
        if slope <= 0:
            return my, 0.0
        latency = my - slope * mx
        if latency < 0:  # a straight line through the origin fits better than a negative latency
            return 0.0, sum(b * s for b, s in points) / sum(b * b for b, _ in points)
        return latency, slope

    def profiles(self) -> dict[str, list[tuple[int, float]]]:
        """{peer: [(blocks, seconds) at GRID]} for every peer measured."""
        out, oldest = {}, self.clock() - self.max_age
        for peer, pts in list(self._points.items()):
            fresh = [(b, s) for b, s, at in pts if at >= oldest]
            if fresh:
                latency, per_block = self.fit(fresh)
                out[peer] = [(b, latency + per_block * b) for b in GRID]
        return out
