"""Director: from a parsed request to a routing decision and back (candidates, scheduling, hooks, log, metrics).

The stream handler owns the protocol; the director owns what happens to one request between
"body complete" and "response done", so it can be driven without gRPC in unit tests.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from epp.datastore import Datastore, Endpoint
from epp.observability.decision_log import DECISION_MSG, FAILURE_MSG, decision_fields, failure_fields
from epp.observability.logging import get_logger
from epp.observability.metrics import EPPMetrics
from epp.scheduling.framework import LLMRequest, SchedulingError, SchedulingResult
from epp.scheduling.scheduler import NO_CANDIDATES, Scheduler


@dataclass(slots=True)
class InFlight:
    """A scheduled request until its response completes (or it is cancelled / times out)."""

    request: LLMRequest
    result: SchedulingResult | None
    started: float
    finished: bool = False
    input_tokens: int | None = None
    output_tokens: int | None = None
    response_bytes: int = 0
    status: int = 0


@dataclass
class Director:
    datastore: Datastore
    scheduler: Scheduler
    metrics: EPPMetrics
    config_profile: str | None = None
    request_timeout: float = 600.0  # safety net: releases per-request state of streams that never end
    disable_subset_filter: bool = False
    rng: random.Random = field(default_factory=random.Random)
    inflight: dict[int, InFlight] = field(default_factory=dict)
    log: Any = field(default_factory=lambda: get_logger("epp.director"))

    # -- candidates -----------------------------------------------------------------------------
    def candidates(self, subset: Sequence[str] | None) -> Sequence[Endpoint]:
        endpoints = self.datastore.endpoints()
        if subset is None or self.disable_subset_filter:
            return endpoints
        wanted = set(subset)
        return [e for e in endpoints if e.hostport in wanted]

    def pick_for_headers_only(self, subset: Sequence[str] | None) -> Endpoint:
        """GIE: a request without a body is not scheduled; any endpoint will do."""
        cands = self.candidates(subset)
        if not cands:
            if not self.datastore.endpoints():
                raise SchedulingError("Internal", "no pods available in datastore")
            raise SchedulingError("ServiceUnavailable", NO_CANDIDATES)
        return self.rng.choice(list(cands))

    # -- scheduling -----------------------------------------------------------------------------
    def schedule(self, request: LLMRequest, subset: Sequence[str] | None) -> InFlight:
        """Schedule, run PreRequest hooks, log the decision. Raises SchedulingError (logged, counted)."""
        m = self.metrics
        t0 = time.perf_counter()
        try:
            result = self.scheduler.schedule(request, self.candidates(subset))
        except SchedulingError as e:
            m.scheduler_e2e.observe((), time.perf_counter() - t0)
            series = m.series_for(request)  # a refused request never adds a label value
            series.request_total.inc()
            series.request_sizes.observe(request.body_size)
            m.scheduler_attempt(request, None)
            self.fail(request, e)
            raise
        m.scheduler_e2e.observe((), time.perf_counter() - t0)
        series = m.series_for(request, admit=True)
        series.request_total.inc()
        series.request_sizes.observe(request.body_size)
        self.scheduler.pre_request(request, result)
        flight = InFlight(request, result, time.monotonic())
        self.inflight[id(request)] = flight
        series.running.inc()
        primary = result.targets[0]
        m.selection(primary.hostport, primary.kv_backend or "none").inc()
        m.scheduler_attempt(request, primary)
        self.log.info(DECISION_MSG, **decision_fields(request, result, self.config_profile))
        return flight

    def fail(self, request: LLMRequest | None, error: SchedulingError) -> None:
        self.metrics.series_for(request).error(error.code).inc()
        self.log.warning(FAILURE_MSG, **failure_fields(request, error, self.config_profile))

    # -- completion -----------------------------------------------------------------------------
    def complete(self, flight: InFlight, outcome: str) -> None:
        """Release everything the request holds, exactly once."""
        if flight.finished:
            return
        flight.finished = True
        self.inflight.pop(id(flight.request), None)
        req = flight.request
        series = self.metrics.series_for(req)
        series.running.dec()
        if outcome == "success":
            elapsed = time.monotonic() - flight.started
            series.request_duration.observe(elapsed)
            series.response_sizes.observe(flight.response_bytes)
            if isinstance(flight.input_tokens, int):
                series.input_tokens.observe(flight.input_tokens)
            if isinstance(flight.output_tokens, int) and flight.output_tokens > 0:
                series.output_tokens.observe(flight.output_tokens)
                series.normalized_tpot.observe(elapsed / flight.output_tokens)
        elif outcome == "error":
            series.error("ModelServerError").inc()
        if flight.result is not None:
            self.scheduler.response_complete(req, flight.result, outcome)
        if outcome != "success":
            status = flight.status if 100 <= flight.status <= 599 else None
            self.log.info("Request ended", request_id=req.request_id, outcome=outcome, status=status)

    def reap_expired(self, now: float | None = None) -> int:
        """Release requests older than request_timeout (their stream never ended)."""
        now = time.monotonic() if now is None else now
        expired = [f for f in self.inflight.values() if now - f.started > self.request_timeout]
        for f in expired:
            self.complete(f, "timeout")
        return len(expired)
