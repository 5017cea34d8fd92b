"""Director: from a parsed request to a routing decision and back (candidates, scheduling, hooks, log, metrics).

The stream handler owns the protocol; the director owns what happens to one request between
"body complete" and "response done", so it can be driven without gRPC in unit tests.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Mapping, Sequence

from epp.datastore import Datastore, Endpoint
from epp.datastore.objectives import Objectives
from epp.endpoint_health import Admission, HealthMonitor
from epp.endpoint_health import outcomes as oc
from epp.observability.decision_log import DECISION_MSG, FAILURE_MSG, decision_fields, failure_fields
from epp.observability.logging import get_logger
from epp.observability.metrics import EPPMetrics
from epp.requesthandling.parsers import OpenAIParser, ParserChain
from epp.scheduling.framework import LLMRequest, SchedulingError, SchedulingResult
from epp.scheduling.scheduler import NO_CANDIDATES, Scheduler

SHED_MESSAGE = "system saturated, sheddable request dropped"


@dataclass(slots=True)
class InFlight:
    """A scheduled request until its response completes (or it is cancelled / times out).

    Setting `status` (the response headers arrived) stamps `first_byte_at`, the moment the
    endpoint started answering: endpoint health reads it for time to first byte and hangs.
    """

    request: LLMRequest
    result: SchedulingResult | None
    started: float
    finished: bool = False
    input_tokens: int | None = None
    output_tokens: int | None = None
    response_bytes: int = 0
    _status: int = 0
    endpoint_scores: dict[str, float] | None = None  # --emit-endpoint-scores: ip:port -> weighted total
    first_byte_at: float = 0.0
    verdict: str = ""  # a failure endpoint health's watchdog already recorded (no first byte in time, stalled)
    stream_error: int = 0  # the status in an SSE error event the response carried (it started as a 200)

    @property
    def status(self) -> int:
        return self._status

    @status.setter
    def status(self, value: int) -> None:
        self._status = value
        if not self.first_byte_at:
            self.first_byte_at = time.monotonic()


@dataclass
class Director:
    datastore: Datastore
    scheduler: Scheduler
    metrics: EPPMetrics
    config_profile: str | None = None
    request_timeout: float = 600.0  # safety net: releases per-request state of streams that never end
    disable_subset_filter: bool = False
    parsers: ParserChain = field(default_factory=lambda: ParserChain([OpenAIParser("openai-parser")]))
    objectives: Objectives = field(default_factory=Objectives)
    saturation_detector: Any = None  # sheds negative-priority requests when the pool is saturated
    flow_control: Any = None  # epp.flowcontrol.controller.FlowController when the flowControl gate is on
    emit_endpoint_scores: bool = False
    health: HealthMonitor | None = None
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

    def admitted(self, subset: Sequence[str] | None) -> Admission:
        """The candidates endpoint health lets through (ejected, unready and busy half-open endpoints leave first)."""
        cands = self.candidates(subset)
        return self.health.admit(cands) if self.health is not None else Admission(cands)

    def pick_for_headers_only(self, subset: Sequence[str] | None) -> Endpoint:
        """GIE: a request without a body is not scheduled; any healthy endpoint will do."""
        admission = self.admitted(subset)
        cands = admission.endpoints
        if not cands:
            if not self.datastore.endpoints():
                raise SchedulingError("Internal", "no pods available in datastore")
            raise SchedulingError("ServiceUnavailable", _no_healthy(admission) if admission.excluded else NO_CANDIDATES)
        return self.rng.choice(list(cands))

    # -- parsing and admission ----------------------------------------------------------------------
    def parse_request(self, request_id: str, path: str, headers: Mapping[str, str], raw: bytes,
                      model_rewrite: str | None = None) -> LLMRequest:
        """The configured parsers turn the body into an LLMRequest; priority and flow come from the headers."""
        request = self.parsers.parse(request_id, path, headers, raw, model_rewrite)
        request.priority, request.fairness_id = self.objectives.for_request(headers)
        return request

    def admit(self, request: LLMRequest, subset: Sequence[str] | None) -> Awaitable[None] | None:
        """None: schedule now. An awaitable: the request waits in flow control first.

        Without the flowControl gate only sheddable requests (priority < 0) are checked, and they
        get 429 when the saturation detector reads >= 1.0 over their candidates (GIE/llm-d legacy
        admission). Raises SchedulingError (logged, counted) when the request is refused.
        """
        flow = self.flow_control
        if flow is not None:
            try:
                waiting = flow.submit(request.request_id, request.priority, request.fairness_id, request.body_size, subset)
            except SchedulingError as e:
                self.fail(request, e)
                raise
            return None if waiting is None else self._wait_for_dispatch(request, waiting)
        if request.priority < 0 and self.saturation_detector is not None:
            if self.saturation_detector.saturation(self.candidates(subset)) >= 1.0:
                err = SchedulingError("ResourceExhausted", SHED_MESSAGE)
                self.fail(request, err)
                raise err
        return None

    async def _wait_for_dispatch(self, request: LLMRequest, waiting: Awaitable[None]) -> None:
        try:
            await waiting
        except SchedulingError as e:
            self.fail(request, e)
            raise

    # -- scheduling -----------------------------------------------------------------------------
    def schedule(self, request: LLMRequest, subset: Sequence[str] | None) -> InFlight:
        """Schedule, run PreRequest hooks, log the decision. Raises SchedulingError (logged, counted)."""
        try:
            return self._schedule(request, subset)
        finally:
            if self.flow_control is not None:
                self.flow_control.handoff_complete()  # the next queued request may be dispatched

    def _schedule(self, request: LLMRequest, subset: Sequence[str] | None) -> InFlight:
        m = self.metrics
        t0 = time.perf_counter()
        admission = self.admitted(subset)
        try:
            if not admission.endpoints and admission.excluded:
                raise SchedulingError("ServiceUnavailable", _no_healthy(admission))
            result = self.scheduler.schedule(request, admission.endpoints)
        except SchedulingError as e:
            m.scheduler_e2e.observe((), time.perf_counter() - t0)
            series = m.series_for(request)  # a refused request never adds a label value
            series.request_total.inc()
            series.request_sizes.observe(request.body_size)
            m.scheduler_attempt(request, None)
            if e.result is not None:
                e.result.excluded, e.result.health_panic = dict(admission.excluded), admission.panic
            self.fail(request, e, admission.excluded)
            raise
        m.scheduler_e2e.observe((), time.perf_counter() - t0)
        if admission.excluded:
            result.excluded, result.health_panic = dict(admission.excluded), admission.panic
        series = m.series_for(request, admit=True)
        series.request_total.inc()
        series.request_sizes.observe(request.body_size)
        self.scheduler.pre_request(request, result)
        flight = InFlight(request, result, time.monotonic())
        if self.emit_endpoint_scores:
            flight.endpoint_scores = endpoint_scores(result)
        self.inflight[id(request)] = flight
        series.running.inc()
        primary = result.targets[0]
        if self.health is not None:
            self.health.scheduled(id(request), primary)
        m.selection(primary.hostport, primary.kv_backend or "none").inc()
        m.scheduler_attempt(request, primary)
        self.log.info(DECISION_MSG, **decision_fields(request, result, self.config_profile))
        return flight

    def fail(self, request: LLMRequest | None, error: SchedulingError, excluded: Mapping[str, str] | None = None) -> None:
        self.metrics.series_for(request).error(error.code).inc()
        fields = failure_fields(request, error, self.config_profile)
        if excluded and "excluded" not in fields:
            fields["excluded"] = dict(excluded)
        self.log.warning(FAILURE_MSG, **fields)

    # -- completion -----------------------------------------------------------------------------
    def complete(self, flight: InFlight, outcome: str) -> None:
        """Release everything the request holds, exactly once, and tell endpoint health how it ended.

        `outcome` is how the stream ended (success | error | cancelled | timeout); plugins hear
        what that says about the endpoint (see `ResponseComplete`).
        """
        if flight.finished:
            return
        flight.finished = True
        self.inflight.pop(id(flight.request), None)
        req = flight.request
        kind = flight.verdict or oc.classify(outcome, flight.stream_error or flight.status, flight.first_byte_at > 0)
        target = flight.result.targets[0] if flight.result is not None and flight.result.targets else None
        if self.health is not None and target is not None and not flight.verdict:
            ttfb = flight.first_byte_at - flight.started if flight.first_byte_at else None
            detail = f"status {flight.status}" if flight.status else ""
            if flight.stream_error:
                detail = f"error event {flight.stream_error} in a {flight.status} stream"
            self.health.record(target, kind, id(req), ttfb=ttfb, detail=detail, routed_at=flight.started)
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
            self.scheduler.response_complete(req, flight.result, oc.plugin_outcome(kind))
        if self.flow_control is not None:
            self.flow_control.notify()  # capacity was released
        if kind != oc.SUCCESS:
            status = flight.status if 100 <= flight.status <= 599 else None
            self.log.info("Request ended", request_id=req.request_id, outcome=kind, status=status,
                          endpoint=target.key if target is not None else None, seconds=round(time.monotonic() - flight.started, 3))

    def reap_expired(self, now: float | None = None) -> int:
        """Release requests older than request_timeout (their stream never ended)."""
        now = time.monotonic() if now is None else now
        expired = [f for f in self.inflight.values() if now - f.started > self.request_timeout]
        for f in expired:
            self.complete(f, "timeout")
        return len(expired)


def endpoint_scores(result: SchedulingResult) -> dict[str, float] | None:
    """llm-d's `x-gateway-destination-endpoint-scores`: every endpoint the primary profile scored → its weighted total."""
    primary = result.primary
    if not primary.scores:
        return None  # the profile ran no scorers
    hostport = {e.key: e.hostport for e in primary.candidates}
    return {hostport[k]: t for k, t in zip(primary.scored_keys, primary.totals) if k in hostport}


def _no_healthy(admission: Admission) -> str:
    why = "; ".join(f"{key} {reason}" for key, reason in admission.excluded.items())
    return f"no healthy endpoint ({why})"
