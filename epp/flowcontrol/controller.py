"""The flow controller: requests wait in priority bands until the pool has room, then go to scheduling.

Semantics follow llm-d's flow-control layer (feature gate `flowControl`):
- A request joins the band of its priority (InferenceObjective), in the flow of its fairness ID.
  Bands are strict: a higher band always dispatches first. Inside a band the fairness policy picks
  the flow, and flows are first come, first served.
- A band dispatches while the saturation detector's reading over the request's candidates is
  below the usage-limit policy's threshold (1.0 by default). An empty pool reads 1.0, so requests
  wait for endpoints to appear (scale from zero).
- Capacity: the global and per-band `maxRequests` / `maxBytes` bound what may wait; a request
  that does not fit is rejected at once with 429.
- TTL: a request waits at most `defaultRequestTTL` (60s) while the pool has endpoints — then 429 —
  and `noEndpointRequestTTL` (default: the same) while it has none — then 503. Each change of
  regime starts a fresh budget; "0s" disables the bound. A client that disconnects leaves the queue.

When nothing waits and the pool has room, `submit` returns None and the request proceeds without
a single await, so the gate costs a saturation reading and nothing more.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from epp.datastore.endpoint import Endpoint
from epp.flowcontrol.types import FairnessPolicy, OrderingPolicy, SaturationDetector, UsageLimitPolicy
from epp.observability.logging import get_logger
from epp.scheduling.framework import SchedulingError

log = get_logger("epp.flowcontrol")

DEFAULT_BAND_MAX_BYTES = 1_000_000_000
DEFAULT_BAND_MAX_REQUESTS = 5000
DEFAULT_REQUEST_TTL = 60.0
SWEEP_INTERVAL = 0.1  # how often queued requests are checked against their TTL
POLL_INTERVAL = 0.02  # how often a saturated pool is re-read while requests wait
HANDOFF_TIMEOUT = 0.05  # the longest a dispatch waits for the previous request to be scheduled


@dataclass(frozen=True)
class BandTemplate:
    max_bytes: int = DEFAULT_BAND_MAX_BYTES
    max_requests: int = DEFAULT_BAND_MAX_REQUESTS
    fairness: FairnessPolicy | None = None  # None: the controller's default policy
    ordering: OrderingPolicy | None = None


@dataclass
class FlowControlSettings:
    detector: SaturationDetector
    usage_limit: UsageLimitPolicy
    fairness: FairnessPolicy
    ordering: OrderingPolicy
    max_bytes: int = 0  # 0: no global limit
    max_requests: int = 0
    default_ttl: float = DEFAULT_REQUEST_TTL  # 0: no bound while the pool has endpoints
    no_endpoint_ttl: float | None = None  # None: same as default_ttl
    bands: dict[int, BandTemplate] = field(default_factory=dict)
    default_band: BandTemplate = field(default_factory=BandTemplate)
    negative_band: BandTemplate | None = None

    def template(self, priority: int) -> BandTemplate:
        if priority in self.bands:
            return self.bands[priority]
        if priority < 0 and self.negative_band is not None:
            return self.negative_band
        return self.default_band


class QueueItem:
    __slots__ = ("request_id", "priority", "fairness_id", "size", "subset", "enqueued", "regime_empty", "regime_start",
                 "future", "done", "seq")

    def __init__(self, request_id: str, priority: int, fairness_id: str, size: int, subset: Sequence[str] | None,
                 now: float, seq: int, future: asyncio.Future) -> None:
        self.request_id, self.priority, self.fairness_id, self.size, self.subset = request_id, priority, fairness_id, size, subset
        self.enqueued = self.regime_start = now
        self.regime_empty = False
        self.future = future
        self.done = False
        self.seq = seq


class Flow:
    __slots__ = ("fairness_id", "items")

    def __init__(self, fairness_id: str) -> None:
        self.fairness_id = fairness_id
        self.items: deque[QueueItem] = deque()

    def head(self) -> QueueItem | None:
        while self.items and self.items[0].done:
            self.items.popleft()
        return self.items[0] if self.items else None

    def head_enqueued_at(self) -> float:
        h = self.head()
        return h.enqueued if h else float("inf")


class Band:
    __slots__ = ("priority", "template", "flows", "count", "bytes")

    def __init__(self, priority: int, template: BandTemplate) -> None:
        self.priority, self.template = priority, template
        self.flows: dict[str, Flow] = {}
        self.count = 0
        self.bytes = 0


Candidates = Callable[[Sequence[str] | None], Sequence[Endpoint]]
Outcome = Callable[[int, str, float], None]  # (priority, outcome, seconds waited): for metrics


class FlowController:
    def __init__(self, settings: FlowControlSettings, candidates: Candidates, *, clock: Callable[[], float] = time.monotonic,
                 on_outcome: Outcome | None = None) -> None:
        self.settings = settings
        self.candidates = candidates
        self.clock = clock
        self.on_outcome = on_outcome
        self.bands: dict[int, Band] = {}
        self.queued = 0
        self.queued_bytes = 0
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._handoff = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False

    # -- admission ------------------------------------------------------------------------------
    def submit(self, request_id: str, priority: int, fairness_id: str, size: int, subset: Sequence[str] | None) -> asyncio.Future | None:
        """None: dispatched now. A future: resolves when dispatched, or fails with a SchedulingError."""
        s = self.settings
        if self._stopping:
            raise SchedulingError("ServiceUnavailable", "flow controller shutting down: request rejected by flow control")
        if not self._higher_or_equal_waiting(priority):
            cands = self.candidates(subset)
            if cands and s.detector.saturation(cands) < s.usage_limit.limit(priority):
                self._outcome(priority, "Dispatched", 0.0)
                return None
        band = self._band(priority)
        t = band.template
        problem = None
        if s.max_requests and self.queued + 1 > s.max_requests:
            problem = f"global maxRequests {s.max_requests} reached"
        elif s.max_bytes and self.queued_bytes + size > s.max_bytes:
            problem = f"global maxBytes {s.max_bytes} reached"
        elif band.count + 1 > t.max_requests:
            problem = f"priority band {priority} maxRequests {t.max_requests} reached"
        elif band.bytes + size > t.max_bytes:
            problem = f"priority band {priority} maxBytes {t.max_bytes} reached"
        if problem:
            self._outcome(priority, "RejectedCapacity", 0.0)
            raise SchedulingError("ResourceExhausted", f"request rejected by flow control: capacity exceeded ({problem})")
        loop = asyncio.get_running_loop()
        item = QueueItem(request_id, priority, fairness_id, size, subset, self.clock(), next(self._seq), loop.create_future())
        item.regime_empty = not self.candidates(subset)
        flow = band.flows.get(fairness_id)
        if flow is None:
            flow = band.flows[fairness_id] = Flow(fairness_id)
        flow.items.append(item)
        band.count += 1
        band.bytes += size
        self.queued += 1
        self.queued_bytes += size
        item.future.add_done_callback(lambda f, it=item: self._on_done(it))
        self._ensure_running()
        self._wake.set()
        return item.future

    def handoff_complete(self) -> None:
        """The director has scheduled (or failed) a dispatched request: the next one may go."""
        self._handoff.set()

    def notify(self) -> None:
        """Capacity may have changed (a request ended): look at the queue again."""
        if self.queued:
            self._wake.set()

    # -- the dispatch loop ----------------------------------------------------------------------
    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="flow-control-dispatch")

    async def _run(self) -> None:
        next_sweep = self.clock() + SWEEP_INTERVAL
        while self.queued:
            if self.clock() >= next_sweep:
                self._sweep()
                next_sweep = self.clock() + SWEEP_INTERVAL
            item = self._next_dispatchable()
            if item is None:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=min(POLL_INTERVAL, SWEEP_INTERVAL))
                except asyncio.TimeoutError:
                    pass
                continue
            self._handoff.clear()
            self._finish(item, "Dispatched")
            item.future.set_result(None)
            try:  # let the dispatched request be scheduled (and counted) before reading saturation again
                await asyncio.wait_for(self._handoff.wait(), timeout=HANDOFF_TIMEOUT)
            except asyncio.TimeoutError:
                pass

    def _next_dispatchable(self) -> QueueItem | None:
        s = self.settings
        for priority in sorted(self.bands, reverse=True):
            band = self.bands[priority]
            if not band.count:
                continue
            flows = [f for f in band.flows.values() if f.head() is not None]
            if not flows:
                continue
            fairness = band.template.fairness or s.fairness
            item = flows[fairness.pick_flow(flows)].head()
            assert item is not None
            cands = self.candidates(item.subset)
            if cands and s.detector.saturation(cands) < s.usage_limit.limit(priority):
                return item
            return None  # strict priority: lower bands wait behind a gated higher band
        return None

    def _sweep(self) -> None:
        s = self.settings
        now = self.clock()
        no_ep_ttl = s.default_ttl if s.no_endpoint_ttl is None else s.no_endpoint_ttl
        longest = max(s.default_ttl, no_ep_ttl) if s.default_ttl and no_ep_ttl else 0.0
        for band in list(self.bands.values()):
            for flow in list(band.flows.values()):
                for item in list(flow.items):
                    if item.done:
                        continue
                    empty = not self.candidates(item.subset)
                    if empty != item.regime_empty:
                        item.regime_empty, item.regime_start = empty, now
                    ttl = no_ep_ttl if empty else s.default_ttl
                    waited = now - item.regime_start
                    if (ttl and waited > ttl) or (longest and now - item.enqueued > longest + SWEEP_INTERVAL):
                        if empty:
                            self._evict(item, "EvictedNoEndpoints", SchedulingError(
                                "ServiceUnavailable", f"request timed out in queue and no endpoints are available: waited {now - item.enqueued:.1f}s"))
                        else:
                            self._evict(item, "EvictedTTL", SchedulingError(
                                "ResourceExhausted", f"request timed out in queue: waited {now - item.enqueued:.1f}s for the pool to have room"))

    def _evict(self, item: QueueItem, outcome: str, error: SchedulingError) -> None:
        self._finish(item, outcome)
        if not item.future.done():
            item.future.set_exception(error)

    # -- bookkeeping ------------------------------------------------------------------------------
    def _band(self, priority: int) -> Band:
        band = self.bands.get(priority)
        if band is None:
            band = self.bands[priority] = Band(priority, self.settings.template(priority))
        return band

    def _higher_or_equal_waiting(self, priority: int) -> bool:
        return any(b.count for p, b in self.bands.items() if p >= priority)

    def _finish(self, item: QueueItem, outcome: str) -> None:
        if item.done:
            return
        item.done = True
        band = self.bands[item.priority]
        band.count -= 1
        band.bytes -= item.size
        self.queued -= 1
        self.queued_bytes -= item.size
        flow = band.flows.get(item.fairness_id)
        if flow is not None and flow.head() is None:
            del band.flows[item.fairness_id]
        self._outcome(item.priority, outcome, self.clock() - item.enqueued)

    def _on_done(self, item: QueueItem) -> None:
        if item.future.cancelled():  # the client went away while queued
            self._finish(item, "EvictedContextCancelled")

    def _outcome(self, priority: int, outcome: str, waited: float) -> None:
        if self.on_outcome is not None:
            self.on_outcome(priority, outcome, waited)

    # -- lifecycle ----------------------------------------------------------------------------------
    async def stop(self) -> None:
        """Refuse new requests and answer every queued one with 503."""
        self._stopping = True
        for band in list(self.bands.values()):
            for flow in list(band.flows.values()):
                for item in list(flow.items):
                    if not item.done:
                        self._evict(item, "EvictedOther", SchedulingError(
                            "ServiceUnavailable", "flow controller shutting down: request rejected by flow control"))
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    def stats(self) -> dict[str, Any]:
        return {
            "queued": self.queued,
            "queued_bytes": self.queued_bytes,
            "bands": {p: {"requests": b.count, "bytes": b.bytes, "flows": len(b.flows)} for p, b in sorted(self.bands.items()) if b.count},
        }
