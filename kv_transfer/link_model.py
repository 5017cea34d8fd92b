"""A FIFO link with a bandwidth cap and a fixed latency.

Transfers share the link in order: one that starts while another is on the wire waits for it.
`schedule(n)` returns when the bytes would be fully delivered; backends make data visible to
the receiver no earlier than that, on top of what the real copy took.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class LinkModel:
    bandwidth_bytes_per_s: float = 0.0  # 0 = unlimited (only the real copy time counts)
    latency_s: float = 0.0
    _free_at: float = field(default=0.0, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _base: float = field(default=0.0, repr=False)  # the bandwidth before any `scale`

    @classmethod
    def from_gbps(cls, gigabytes_per_s: float, latency_ms: float = 0.0) -> "LinkModel":
        return cls(gigabytes_per_s * 1e9, latency_ms / 1000.0)

    def scale(self, factor: float) -> None:
        """Run the link at `factor` × the bandwidth it was created with (a fabric degraded, or restored with 1)."""
        if factor <= 0:
            raise ValueError("a link's bandwidth factor must be > 0")
        with self._lock:
            self._base = self._base or self.bandwidth_bytes_per_s
            self.bandwidth_bytes_per_s = self._base * factor

    @property
    def enabled(self) -> bool:
        return self.bandwidth_bytes_per_s > 0 or self.latency_s > 0

    def schedule(self, nbytes: int, now: float | None = None) -> float:
        """Wall-clock time (time.time()) at which `nbytes` sent now would have arrived."""
        now = time.time() if now is None else now
        wire = nbytes / self.bandwidth_bytes_per_s if self.bandwidth_bytes_per_s > 0 else 0.0
        with self._lock:
            start = max(now, self._free_at)
            self._free_at = start + wire
        return start + wire + self.latency_s

    def describe(self) -> str:
        if not self.enabled:
            return "unlimited"
        return f"{self.bandwidth_bytes_per_s / 1e9:g} GB/s, {self.latency_s * 1000:g} ms latency"
