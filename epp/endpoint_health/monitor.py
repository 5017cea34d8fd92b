"""Endpoint health: learns from outcomes, readiness and a watchdog; decides who may be picked.

Envoy's outlier detection, applied before the scheduler's filters run:

* **ejection** after `consecutive5xx` 5xx answers or `consecutiveGatewayFailure` gateway failures
  (502/503/504, no first byte in time, a stalled stream) in a row, and every `interval` by success
  rate (mean − stdevFactor/1000 × stdev, over endpoints with enough requests) and failure
  percentage. An ejection lasts baseEjectionTime × the ejection multiplier, which grows with each
  ejection and shrinks by one each interval the endpoint stays in, capped at maxEjectionTime. No
  more than maxEjectionPercent of the pool is ejected (one endpoint always may be);
* **readiness**: an endpoint whose /health fails is left out until it passes again (Envoy's active
  health checking); one that went down and came back is un-ejected at once, as Envoy's
  `successful_active_health_check_uneject_host` does, so a restarted backend need not sit out the
  rest of an ejection;
* **half-open re-admission**: after an ejection ends or readiness returns, the endpoint takes one
  trial request at a time; the first success re-admits it, a failure ejects it again for longer;
* **panic**: when fewer than panicThreshold % of the candidates are admissible, the EPP routes
  anyway (Envoy's healthy panic threshold) — to the excluded endpoints whose last request did not
  fail if there are any (a check that failed on a loaded machine), else to all of them — and the
  decision log says so.

Every exclusion has a reason that goes into the decision log; transitions are logged as events.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

from epp.datastore import Datastore, Endpoint
from epp.endpoint_health import outcomes as oc
from epp.endpoint_health import state as hs
from epp.endpoint_health.policy import HealthPolicy
from epp.endpoint_health.readiness import ReadinessProber, Verdict
from epp.endpoint_health.state import EndpointHealth
from epp.observability.logging import get_logger

TTFB_ALPHA = 0.2
WATCH_PERIOD = 0.25  # seconds between watchdog sweeps of the requests in flight
_NONE: Mapping[str, str] = MappingProxyType({})


class Admission(NamedTuple):
    """The candidates the scheduler may use, and who was left out and why."""

    endpoints: Sequence[Endpoint]
    excluded: Mapping[str, str] = _NONE  # endpoint key -> reason
    panic: bool = False


class HealthMonitor:
    """One per EPP. Synchronous methods run on the event loop; `start()` adds the prober and the sweeps."""

    type_name = "endpoint-health"

    def __init__(self, name: str = "endpoint-health", policy: HealthPolicy | None = None, *,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None) -> None:
        self.name = name
        self.policy = policy or HealthPolicy()
        self.clock = clock
        self.rng = rng or random.Random()
        self.states: dict[str, EndpointHealth] = {}
        self._watched: set[str] = set()  # keys that are not plainly healthy: the only ones admit() looks at
        self._progress: dict[int, tuple[int, float]] = {}  # id(flight) -> (response bytes seen, when they last grew)
        self._pool_size: Callable[[], int] = lambda: len(self.states)
        self._datastore: Datastore | None = None
        self.prober: ReadinessProber | None = None
        self._tasks: list[asyncio.Task] = []
        self.log = get_logger("epp.endpoint_health")

    # -- the gate (hot path) ----------------------------------------------------------------------
    def admit(self, endpoints: Sequence[Endpoint]) -> Admission:
        if not self._watched or not self.policy.enabled:
            return Admission(endpoints)
        now = self.clock()
        kept: list[Endpoint] = []
        excluded: dict[str, str] = {}
        for e in endpoints:
            reason = self._exclusion(e.key, now) if e.key in self._watched else None
            if reason is None:
                kept.append(e)
            else:
                excluded[e.key] = reason
        if not excluded:
            return Admission(endpoints)
        if len(kept) * 100 < self.policy.panic_threshold * len(endpoints):
            # panic: rather the excluded endpoints whose last request did not fail (a flaky check) than all of them
            plausible = [e for e in endpoints if e.key not in excluded or not self.states[e.key].last_request_failed]
            return Admission(plausible or endpoints, excluded, panic=True)
        return Admission(kept, excluded)

    def _exclusion(self, key: str, now: float) -> str | None:
        st = self.states[key]
        if st.ejected_until:
            if now < st.ejected_until:
                return f"ejected: {st.ejection_detail}, {st.ejected_until - now:.1f}s left"
            self._end_ejection(st, "ejection time elapsed")
        if st.ready is False:
            return f"unready: {st.readiness_detail}"
        if st.half_open:
            return "half-open: trial request in flight" if st.trial is not None else None
        self._watched.discard(key)
        return None

    def scheduled(self, flight_id: int, endpoint: Endpoint) -> None:
        """The request `flight_id` was routed to `endpoint`: a half-open endpoint's trial starts."""
        if endpoint.key in self._watched:
            st = self.states[endpoint.key]
            if st.half_open and st.trial is None:
                st.trial = flight_id

    # -- passive outcomes -----------------------------------------------------------------------------
    def record(self, endpoint: Endpoint, kind: str, flight_id: int | None = None, *, ttfb: float | None = None,
               detail: str = "", routed_at: float | None = None) -> None:
        """One request's end. `routed_at` (monotonic): a failure of a request routed before the endpoint went
        half-open is old news and does not fail its trial."""
        if self._datastore is not None and self._datastore.get(endpoint.key) is None:
            return  # it left the pool while the request was in flight
        st = self._state(endpoint)
        st.outcomes[kind] = st.outcomes.get(kind, 0) + 1
        now = self.clock()
        if kind == oc.SUCCESS or kind == oc.CLIENT_ERROR:  # any answer that is not a 5xx resets Envoy's counters
            st.consecutive_5xx = st.consecutive_gateway = 0
            st.last_request_failed = False
            if kind == oc.SUCCESS:
                st.interval_success += 1
                if ttfb is not None:
                    st.ttfb_ewma = ttfb if st.ttfb_ewma is None else (1 - TTFB_ALPHA) * st.ttfb_ewma + TTFB_ALPHA * ttfb
            if st.half_open and not st.ejected_until and st.ready is not False and st.trial in (None, flight_id):
                st.half_open, st.trial = False, None
                self._watched.discard(st.key)
                self.log.info("Endpoint re-admitted", endpoint=st.key, hostport=st.hostport, after=kind)
            return
        if kind in oc.FAILURES:
            if st.trial == flight_id:
                st.trial = None
            st.interval_failure += 1
            st.last_request_failed = True
            st.last_failure = f"{kind}{': ' + detail if detail else ''}"
            st.last_failure_at = now
            st.consecutive_5xx += 1
            st.consecutive_gateway = st.consecutive_gateway + 1 if kind in oc.GATEWAY_FAILURES else 0
            self.probe_soon(st.key)
            if st.ejected_until and now < st.ejected_until:
                return
            o = self.policy.outlier
            if st.half_open:
                if routed_at is None or routed_at >= st.half_open_since:
                    self._eject(st, hs.TRIAL_FAILED, f"half-open trial failed ({st.last_failure})", 100, now)
            elif st.consecutive_gateway >= o.consecutive_gateway_failure:
                self._eject(st, hs.CONSECUTIVE_GATEWAY_FAILURE, f"{st.consecutive_gateway} gateway failures in a row ({st.last_failure})",
                            o.enforcing_consecutive_gateway_failure, now)
            elif st.consecutive_5xx >= o.consecutive_5xx:
                self._eject(st, hs.CONSECUTIVE_5XX, f"{st.consecutive_5xx} 5xx in a row ({st.last_failure})", o.enforcing_consecutive_5xx, now)
            return
        if kind in oc.SUSPICIOUS:
            self.probe_soon(st.key)
        if st.trial == flight_id:
            st.trial = None  # a neutral end: the next request is the trial

    # -- readiness ---------------------------------------------------------------------------------
    def readiness(self, endpoint: Endpoint, verdict: Verdict) -> None:
        st = self._state(endpoint)
        if verdict.instances:
            st.instances = dict(verdict.instances)
        st.readiness_detail = verdict.detail
        rp = self.policy.readiness
        if verdict.ok:
            st.probe_failures = 0
            st.probe_passes += 1
            if st.ready is None:
                st.ready = True
            elif st.ready is False and st.probe_passes >= rp.healthy_threshold:
                st.ready = True
                if st.ejected_until and st.unready_while_ejected:
                    self._end_ejection(st, "ready again after being unready")
                else:
                    st.half_open, st.half_open_since = True, self.clock()
                self._watched.add(st.key)
                self.log.info("Endpoint ready", endpoint=st.key, hostport=st.hostport, readiness=verdict.detail)
            return
        st.probe_passes = 0
        st.probe_failures += 1
        if st.ejected_until:
            st.unready_while_ejected = True
        if st.ready is not False and (verdict.definitive or st.probe_failures >= rp.unhealthy_threshold):
            st.ready = False
            st.trial = None
            self._watched.add(st.key)
            self.log.warning("Endpoint unready", endpoint=st.key, hostport=st.hostport, readiness=verdict.detail)

    def probe_soon(self, key: str) -> None:
        if self.prober is not None:
            self.prober.probe_soon(key)

    # -- ejection ----------------------------------------------------------------------------------
    def _eject(self, st: EndpointHealth, reason: str, detail: str, enforcing: float, now: float) -> bool:
        o = self.policy.outlier
        ejected = sum(1 for s in self.states.values() if s.ejected_until > now)
        total = max(1, self._pool_size())
        if ejected and (ejected + 1) * 100 > o.max_ejection_percent * total:
            self.log.warning("Endpoint not ejected: maxEjectionPercent reached", endpoint=st.key, reason=reason, detail=detail,
                             ejected=ejected, pool=total, max_ejection_percent=o.max_ejection_percent)
            return False
        if enforcing < 100 and self.rng.random() * 100 >= enforcing:
            return False
        st.multiplier += 1
        seconds = o.ejection_time(st.multiplier)
        st.ejected_until = now + seconds
        st.ejection_reason, st.ejection_detail = reason, detail
        st.ejections[reason] = st.ejections.get(reason, 0) + 1
        st.unready_while_ejected = st.ready is False
        st.half_open, st.trial = False, None
        st.consecutive_5xx = st.consecutive_gateway = 0
        self._watched.add(st.key)
        self.log.warning("Endpoint ejected", endpoint=st.key, hostport=st.hostport, reason=reason, detail=detail,
                         ejection_seconds=round(seconds, 3), ejections=sum(st.ejections.values()))
        return True

    def _end_ejection(self, st: EndpointHealth, why: str) -> None:
        st.ejected_until = 0.0
        st.unready_while_ejected = False
        st.half_open, st.trial, st.half_open_since = True, None, self.clock()
        self._watched.add(st.key)
        self.log.info("Endpoint half-open", endpoint=st.key, hostport=st.hostport, reason=why, was=st.ejection_reason)

    def evaluate(self) -> None:
        """Envoy's interval sweep: success-rate and failure-percentage ejection, then the multiplier decays."""
        now = self.clock()
        o = self.policy.outlier
        states = list(self.states.values())
        volume = [(s, s.interval_success + s.interval_failure) for s in states]
        eligible = [(s, 100.0 * s.interval_success / n) for s, n in volume if n >= o.success_rate_request_volume]
        if len(eligible) >= max(1, o.success_rate_minimum_hosts):
            rates = [r for _, r in eligible]
            mean = statistics.fmean(rates)
            threshold = mean - o.success_rate_stdev_factor / 1000.0 * statistics.pstdev(rates)
            for s, r in eligible:
                if r < threshold and not s.ejected_until:
                    self._eject(s, hs.SUCCESS_RATE, f"success rate {r:.1f}% < {threshold:.1f}% (pool mean {mean:.1f}%)",
                                o.enforcing_success_rate, now)
        eligible = [(s, 100.0 * s.interval_failure / n) for s, n in volume if n >= o.failure_percentage_request_volume]
        if len(eligible) >= max(1, o.failure_percentage_minimum_hosts):
            for s, pct in eligible:
                if pct >= o.failure_percentage_threshold and not s.ejected_until:
                    self._eject(s, hs.FAILURE_PERCENTAGE, f"{pct:.0f}% failed (threshold {o.failure_percentage_threshold}%)",
                                o.enforcing_failure_percentage, now)
        for s in states:
            if not s.ejected_until and s.multiplier > 0 and s.interval_failure == 0:
                s.multiplier -= 1
            s.interval_success = s.interval_failure = 0

    # -- the watchdog ------------------------------------------------------------------------------
    def watch(self, flights: Iterable[Any]) -> int:
        """Fail requests that got no first byte by their deadline, or whose response stopped; returns how many."""
        now = self.clock()
        p = self.policy
        found = 0
        alive: set[int] = set()
        for f in flights:
            if f.finished or f.result is None or f.verdict:
                continue
            fid = id(f)
            if not f.first_byte_at:
                waited = now - f.started
                if waited > p.first_byte_deadline(f.request.stream, f.request.max_tokens):
                    f.verdict = oc.FIRST_BYTE_TIMEOUT
                    self.record(f.result.targets[0], oc.FIRST_BYTE_TIMEOUT, id(f.request), detail=f"no response after {waited:.1f}s",
                                routed_at=f.started)
                    found += 1
                continue
            alive.add(fid)
            seen = self._progress.get(fid)
            if seen is None or seen[0] != f.response_bytes:
                self._progress[fid] = (f.response_bytes, now)
            elif now - seen[1] > p.stream_idle_timeout:
                f.verdict = oc.STREAM_STALLED
                self.record(f.result.targets[0], oc.STREAM_STALLED, id(f.request),
                            detail=f"nothing sent for {now - seen[1]:.1f}s after {f.response_bytes} bytes", routed_at=f.started)
                found += 1
        for fid in [k for k in self._progress if k not in alive]:
            del self._progress[fid]
        return found

    # -- bookkeeping -------------------------------------------------------------------------------
    def _state(self, endpoint: Endpoint) -> EndpointHealth:
        st = self.states.get(endpoint.key)
        if st is None:
            st = self.states[endpoint.key] = EndpointHealth(endpoint.key, endpoint.hostport)
        return st

    def forget(self, endpoint: Endpoint) -> None:
        self.states.pop(endpoint.key, None)
        self._watched.discard(endpoint.key)

    def snapshot(self, key: str) -> dict[str, Any] | None:
        st = self.states.get(key)
        return st.snapshot(self.clock()) if st is not None else None

    def snapshots(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [s.snapshot(now) for s in self.states.values()]

    def describe(self) -> dict[str, Any]:
        p = self.policy
        return {"enabled": p.enabled, "readiness": p.readiness.enabled and p.readiness.path, "consecutive5xx": p.outlier.consecutive_5xx,
                "consecutiveGatewayFailure": p.outlier.consecutive_gateway_failure, "baseEjectionTime": p.outlier.base_ejection_time,
                "maxEjectionPercent": p.outlier.max_ejection_percent, "panicThreshold": p.panic_threshold}

    # -- running ------------------------------------------------------------------------------------
    async def start(self, datastore: Datastore, flights: Callable[[], Iterable[Any]]) -> None:
        """Readiness probes, the watchdog and the interval sweep, in the background."""
        if not self.policy.enabled:
            return
        self._datastore = datastore
        self._pool_size = lambda: len(datastore)
        datastore.on_removal(self.forget)
        for ep in datastore.endpoints():
            self._state(ep)
        if self.policy.readiness.enabled:
            self.prober = ReadinessProber(self.policy.readiness, self.readiness, datastore.endpoints)
            await self.prober.start()
        self._tasks.append(asyncio.create_task(self._sweeps(flights), name="health-sweeps"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks.clear()
        if self.prober is not None:
            await self.prober.stop()

    async def _sweeps(self, flights: Callable[[], Iterable[Any]]) -> None:
        next_eval = self.clock() + self.policy.outlier.interval
        while True:
            await asyncio.sleep(WATCH_PERIOD)
            try:
                self.watch(list(flights()))
                if self.clock() >= next_eval:
                    next_eval = self.clock() + self.policy.outlier.interval
                    self.evaluate()
            except Exception:  # a bug here must not stop health tracking for good
                self.log.exception("health sweep failed")
