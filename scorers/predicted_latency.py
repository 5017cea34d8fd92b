"""predicted-latency-scorer: send each request where it costs the least time, its own and others'.

For each candidate endpoint e, this request's prompt of t tokens and its n output tokens, with
k requests already in flight on e:

    TTFT(e)  = wait(e) + t / prefill_tps(e) + transfer(e, t) + spt(e)
    E2E(e)   = TTFT(e) + (n − 1) × spt(e) × (1 + batchSlowdown × k)
    delay(e) = batchSlowdown × spt(e) × Σ_i min(remaining_i, n − 1)      over the k in flight on e
    cost(e)  = calibration(e) × (E2E(e) + contentionWeight × delay(e))
    score(e) = min over candidates of cost / cost(e)

* transfer(e, t): the endpoint's measured KV-transfer profile at t tokens (0 without a profile);
* prefill_tps: the proxy's measured prefill speed (`pdproxy_prefill_tokens_per_second`);
* spt(e): the unloaded time per output token: the proxy's measured decode time per token
  (`pdproxy_decode_seconds_per_token`, measured under the load of the moment) divided by that
  load's slowdown `1 + batchSlowdown × (k − 1)`, so the batch is not counted twice. Until an
  endpoint has measured its speeds the plugin's defaults stand in; speeds older than the
  metrics-staleness threshold are still used (a speed changes slowly; the load terms come from
  this EPP's own bookings, not from scrapes) and those endpoints are named in the log;
* n: the request's max_tokens, or `defaultOutputTokens` when it does not say;
* t counts only the prompt tokens e does not hold: when a prefix-cache producer is configured,
  the prefix it believes e has cached is not prefilled again;
* wait(e): how long work this EPP already sent to e keeps its serial prefill-and-transfer stage
  busy. Every scheduled request pushes e's stage by its own prefill + transfer estimate, so the
  queue is known the moment a request is routed — no scrape lag, which matters in bursts;
* delay(e): what this request costs the others. Joining a decode batch of k slows each of their
  remaining tokens by `batchSlowdown × spt`, for as long as both decode. remaining_i is
  estimated from what this EPP routed: request i's output budget less the tokens it has had
  time to produce since its predicted first token.

Minimising E2E alone is each request's selfish best, and it overloads the fast fabric: every
request sees "nvlink is quicker for me" until nvlink's decode batch has slowed everyone on it.
Adding the delay it imposes makes the sum of all latencies what is minimised (with
`contentionWeight` 1): long prompts, whose transfer time differs most between fabrics, go to the
fast one, and short prompts fill the slow one, where their transfer costs little.

The model calibrates itself per endpoint: when a request it routed completes, the observed
duration over the E2E predicted at routing time feeds an EWMA `calibration(e)` (clamped to
[0.5, 3]). Whatever the model misses on a pair — a busy host, a prefill speed measured under
other load — shows up there and moves traffic. The estimates appear in the decision log.

Only successes teach the model. A failed request (a 5xx, an endpoint the gateway could not reach,
no response in time) would otherwise look like the fastest request there is: instead it pulls
the endpoint's calibration toward the maximum, and its booking stays on the endpoint for as long
as the request was predicted to take, so a backend that fails at once never looks idle or fast.
A client's 4xx or a disconnect just releases the booking.
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from epp.datastore.endpoint import Endpoint
from epp.scheduling.attributes import cached_tokens
from epp.scheduling.estimates import transfer_estimates
from epp.scheduling.framework import CycleState, LLMRequest, SchedulingResult
from epp.scheduling.latency_model import calibrated, delay_to_others, penalised, unloaded_speeds
from epp.scheduling.latency_model import number as _number
from epp.scheduling.registry import PluginContext, register

STATE_KEY = "predicted-latency"


@dataclass(slots=True)
class Flight:
    """A request this scorer routed, until its response completes."""

    routed_at: float
    stage_end: float  # its prefill + transfer end, after what was booked on the endpoint before it
    output_tokens: int
    predicted: float  # uncalibrated E2E at routing time
    request: LLMRequest  # held so that id(request) cannot be reused while tracked


class PredictedLatencyScorer:
    type_name = "predicted-latency-scorer"
    needs_metrics = True

    def __init__(self, name: str, default_prefill_tps: float, default_decode_spt: float, clock: Callable[[], float] = time.monotonic,
                 batch_slowdown: float = 0.05, default_output_tokens: int = 64, contention_weight: float = 1.0,
                 staleness: float = 2.0) -> None:
        self.name = name
        self.staleness = staleness
        self.batch_slowdown = batch_slowdown
        self.default_output_tokens = default_output_tokens
        self.contention_weight = contention_weight
        self.default_prefill_tps = default_prefill_tps
        self.default_decode_spt = default_decode_spt
        self.clock = clock
        self.calibration: dict[str, float] = {}  # endpoint key -> EWMA of observed / predicted E2E
        self._flights: dict[str, dict[int, Flight]] = {}  # endpoint key -> id(request) -> flight
        self._where: dict[int, str] = {}  # id(request) -> endpoint key
        self._held: list[tuple[float, int, str]] = []  # heap of failed bookings still counted: (until, booking key, endpoint)
        self._held_ids = itertools.count(-1, -1)  # their booking keys: negative, never an id()
        self._last: dict[str, dict[str, float]] | None = None

    # -- the model --------------------------------------------------------------------------------
    def _wait(self, key: str, now: float) -> float:
        """Seconds until the endpoint's serial prefill+transfer stage is free, from this EPP's own routing."""
        end = max((f.stage_end for f in self._flights.get(key, {}).values()), default=now)
        return max(0.0, end - now)

    def _speeds(self, e: Endpoint, k: int) -> tuple[float, float]:
        return unloaded_speeds(e.metrics, k, self.default_prefill_tps, self.default_decode_spt, self.batch_slowdown)

    def _delay(self, flights: Sequence[Flight], n: int, spt: float, now: float) -> float:
        """Extra seconds this request's decode adds to the requests already decoding (or about to) on the endpoint."""
        return delay_to_others(self.batch_slowdown, flights, n, spt, now)

    def _drop_held(self, now: float) -> None:
        held = self._held
        while held and held[0][0] <= now:
            _, rid, key = heapq.heappop(held)
            self._flights.get(key, {}).pop(rid, None)

    def estimate(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> dict[str, dict[str, float]]:
        now = self.clock()
        if self._held and self._held[0][0] <= now:
            self._drop_held(now)
        transfer = transfer_estimates(state, request, endpoints)
        cached = cached_tokens(state)  # a prefix the endpoint holds is not prefilled again
        n = request.max_tokens or self.default_output_tokens
        out = {}
        wall = time.monotonic()  # metrics carry monotonic timestamps, whatever clock the bookings use
        stale = [e.key for e in endpoints if e.metrics.age(wall) > self.staleness]
        if stale:
            state.notes.setdefault(self.name, {})["no_fresh_metrics"] = stale
        for e in endpoints:
            flights = list(self._flights.get(e.key, {}).values())
            k = len(flights)
            tps, spt = self._speeds(e, k)
            prefill = max(0, request.prompt_tokens - cached.get(e.key, 0)) / tps
            xfer = transfer.get(e.key, 0.0)
            wait = self._wait(e.key, now)
            ttft = wait + prefill + xfer + spt
            e2e = ttft + max(0, n - 1) * spt * (1.0 + self.batch_slowdown * k)
            delay = self._delay(flights, n, spt, now)
            c = self.calibration.get(e.key, 1.0)
            out[e.key] = {"wait": wait, "prefill": prefill, "transfer": xfer, "spt": spt, "ttft": ttft * c, "e2e": e2e * c,
                          "raw_e2e": e2e, "delay": delay * c, "cost": (e2e + self.contention_weight * delay) * c, "calibration": c}
        state.write(STATE_KEY, out)
        self._last = out  # the cycle's estimates, for PreRequest of the same cycle
        return out

    # -- scorer -----------------------------------------------------------------------------------
    def score(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        est = self.estimate(state, request, endpoints)
        best = min((v["cost"] for v in est.values()), default=0.0)
        note = state.notes.setdefault(self.name, {})
        note["ttft_ms"] = _ms(est, "ttft")
        note["e2e_ms"] = _ms(est, "e2e")
        optional = (("delay_to_others_ms", _ms(est, "delay")), ("wait_ms", _ms(est, "wait")),
                    ("calibration", {k: round(v["calibration"], 3) for k, v in est.items() if v["calibration"] != 1.0}))
        note.update((field, shown) for field, shown in optional if shown)  # an idle stage, an empty batch: nothing to say
        return [1.0 if best <= 0 else best / est[e.key]["cost"] for e in endpoints]

    # -- lifecycle --------------------------------------------------------------------------------
    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        """Book the chosen endpoint: its stage runs this prefill + transfer after what is queued; its batch grows."""
        target = result.targets[0]
        now = self.clock()
        est = (self._last or {}).get(target.key)
        if est is None:  # scored by another plugin only: estimate for this endpoint now
            est = self.estimate(CycleState(), request, [target])[target.key]
        start = now + self._wait(target.key, now)
        rid = id(request)
        self.response_complete(request, result, "rescheduled")  # one booking per request
        self._flights.setdefault(target.key, {})[rid] = Flight(
            now, start + est["prefill"] + est["transfer"], request.max_tokens or self.default_output_tokens, est["raw_e2e"], request)
        self._where[rid] = target.key

    def response_complete(self, request: LLMRequest, result: SchedulingResult | None, outcome: str) -> None:
        key = self._where.pop(id(request), None)
        if key is None:
            return
        flights = self._flights.get(key, {})
        flight = flights.pop(id(request), None)
        if flight is None:
            return
        now = self.clock()
        if outcome == "success" and flight.predicted > 0:
            self.calibration[key] = calibrated(self.calibration.get(key, 1.0), now - flight.routed_at, flight.predicted)
        elif outcome == "error":
            self.calibration[key] = penalised(self.calibration.get(key, 1.0))
            end = flight.routed_at + flight.predicted
            if end > now:
                rid = next(self._held_ids)
                flights[rid] = flight
                heapq.heappush(self._held, (end, rid, key))

    def forget_endpoint(self, endpoint: Endpoint) -> None:
        for rid in self._flights.pop(endpoint.key, {}):
            self._where.pop(rid, None)
        self._held = [h for h in self._held if h[2] != endpoint.key]
        heapq.heapify(self._held)
        self.calibration.pop(endpoint.key, None)


def _ms(est: Mapping[str, Mapping[str, float]], field: str) -> dict[str, float]:
    return {k: round(v[field] * 1000, 2) for k, v in est.items() if v[field] > 0}


@register("predicted-latency-scorer")
def _factory(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> PredictedLatencyScorer:
    p = parameters.get
    s = PredictedLatencyScorer(
        name,
        _number(name, "defaultPrefillTokensPerSecond", p("defaultPrefillTokensPerSecond", 20000.0), positive=True),
        _number(name, "defaultDecodeSecondsPerToken", p("defaultDecodeSecondsPerToken", 0.01), positive=True),
        batch_slowdown=_number(name, "batchSlowdown", p("batchSlowdown", 0.05), positive=False),
        default_output_tokens=int(_number(name, "defaultOutputTokens", p("defaultOutputTokens", 64), positive=True)),
        contention_weight=_number(name, "contentionWeight", p("contentionWeight", 1.0), positive=False),
        staleness=float((ctx.services or {}).get("metrics_staleness", 2.0)),
    )
    if ctx.datastore is not None:
        ctx.datastore.on_removal(s.forget_endpoint)
    return s
