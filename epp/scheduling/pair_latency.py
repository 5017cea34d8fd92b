"""Predicted latency of a P/D route: a (prefill, decode) pair, or prefill on the decode pod itself.

For a prompt of t tokens and n output tokens, on decode pod d with k requests in its batch:

    remote(p, d) = wait(p) + t / prefill_tps(p) + transfer(p → d, t) + spt(d)        (TTFT)
                   + (n − 1) × spt(d) × (1 + batchSlowdown × k)                      (decode)
    local(d)     = wait(d) + t / prefill_tps(d) + spt(d) + the same decode term
    cost(route)  = calibration(route) × (E2E + contentionWeight × (delay(d) + interference))

* wait(x): how long the prefill work this EPP already sent to x keeps x busy (its own bookings,
  no scrape lag); a remote prefill books its prefill on p, a local one on d;
* transfer(p → d, t): the link's measured profile at t tokens (`epp.datastore.links`: live
  from the decode sidecar, the pair, its link class, or the decode endpoint's own profile);
  no profile = 0 and the pair is named in the log, so pairs fall back to load;
* delay(d): what joining d's batch costs the requests decoding there (shared formula);
* interference: a local prefill stalls the k requests decoding on d for about its prefill
  time (× `prefillInterference`) — the cost of not disaggregating that a decode batch pays;
* calibration(route): EWMA of observed / predicted E2E per route (`p->d` or `d`), so a link
  or pod the profiles misjudge — a degraded link among them — loses traffic as requests end.
  It fades back towards 1 with a half-life (`calibrationHalfLife`) while the route is unused,
  so a route that recovered is tried again instead of being shunned for ever.

Prefix-cache hits, when a producer publishes them, shorten the prefill (on the pod that
prefills) and the transfer (blocks the decode pod already holds).
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from epp.datastore.endpoint import Endpoint
from epp.datastore.links import LinkProfiles
from epp.scheduling.estimates import cached_tokens, links_of
from epp.scheduling.framework import ConfigError, CycleState, LLMRequest
from epp.scheduling.latency_model import PARAMETERS, LatencyParams, calibrated, delay_to_others, latency_params, penalised, unloaded_speeds
from epp.scheduling.registry import PluginContext, positive_duration, reject_unknown

NOTE_LIMIT = 16  # routes itemised per decision in the log


@dataclass(slots=True)
class RouteEstimate:
    route: str  # "prefill-key->decode-key", or the decode key for a local prefill
    prefill_on: Endpoint
    decode_on: Endpoint
    wait: float
    prefill: float
    transfer: float
    source: str  # where the transfer profile came from ("" = none)
    ttft: float  # calibrated
    e2e: float  # calibrated
    raw_e2e: float
    delay: float  # calibrated delay to others (+ local-prefill interference)
    cost: float
    calibration: float

    @property
    def remote(self) -> bool:
        return self.prefill_on is not self.decode_on

    def summary(self) -> dict[str, float | str]:
        """The estimate as the decision log shows it (milliseconds)."""
        out: dict[str, float | str] = {"ttft_ms": _ms(self.ttft), "e2e_ms": _ms(self.e2e), "cost_ms": _ms(self.cost)}
        if self.wait > 0:
            out["wait_ms"] = _ms(self.wait)
        if self.remote:
            out["transfer_ms"] = _ms(self.transfer)
            out["link"] = self.source or "no-profile"
        if self.calibration != 1.0:
            out["calibration"] = round(self.calibration, 3)
        return out


def route_key(prefill: Endpoint | None, decode: Endpoint) -> str:
    return decode.key if prefill is None or prefill is decode else f"{prefill.key}->{decode.key}"


@dataclass(slots=True)
class _Seat:
    stage_end: float  # decoding starts
    output_tokens: int


@dataclass(slots=True)
class _Booking:
    prefill_key: str
    decode_key: str
    route: str
    routed_at: float
    predicted: float  # uncalibrated E2E at routing time
    request: LLMRequest  # held so that id(request) cannot be reused while booked


@dataclass(slots=True)
class _DecodeTerms:
    k: int
    spt: float
    tail: float  # (n − 1) × spt × (1 + batchSlowdown × k)
    delay: float  # uncalibrated delay to others
    tokens: int  # KV to move into this pod: the prompt less what it holds cached


class _Cycle:
    """What one scheduling cycle computes once and every route of it reuses (hot path: N prefill × M decode pods)."""

    __slots__ = ("state", "request", "now", "n", "floor", "prefill_side", "decode_side", "seconds", "order_of", "order")

    def __init__(self, state: CycleState, request: LLMRequest, now: float, n: int, floor: float) -> None:
        self.state, self.request, self.now, self.n, self.floor = state, request, now, n, floor
        self.prefill_side: dict[str, tuple[float, float]] = {}  # endpoint key -> (wait, prefill seconds)
        self.decode_side: dict[str, _DecodeTerms] = {}
        self.seconds: dict[tuple[int, int], float] = {}  # (id(profile), tokens) -> transfer seconds
        self.order_of: object = None  # the prefill list `order` was sorted from
        self.order: list[tuple[float, Endpoint]] = []


class PairLatencyModel:
    """Bookings, estimates and calibration of P/D routes; shared by the pair scorer and the cost-based decider."""

    def __init__(self, params: LatencyParams, links: LinkProfiles, *, prefill_interference: float = 1.0,
                 max_transfer: float | None = None, half_life: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.params = params
        self.links = links
        self.prefill_interference = prefill_interference
        self.max_transfer = max_transfer
        self.half_life = half_life
        self.clock = clock
        self._calibration: dict[str, tuple[float, float]] = {}  # route -> (EWMA of observed / predicted E2E, when)
        self._stage: dict[str, dict[int, float]] = {}  # endpoint key -> id(request) -> its prefill's end there
        self._seats: dict[str, dict[int, _Seat]] = {}  # decode endpoint key -> id(request) -> seat
        self._bookings: dict[int, _Booking] = {}
        self._cycle: _Cycle | None = None
        self._recent: dict[str, RouteEstimate] = {}  # this cycle's estimates, for booking the chosen route
        self._held: list[tuple[float, int, str, str]] = []  # failed bookings kept until their predicted end
        self._held_ids = itertools.count(-1, -1)  # their keys in the queues: negative, never an id()

    # -- per-cycle terms --------------------------------------------------------------------------
    def _begin(self, state: CycleState, request: LLMRequest) -> _Cycle:
        c = self._cycle
        if c is None or c.state is not state or c.request is not request:
            if self._held and self._held[0][0] <= self.clock():
                self._drop_held(self.clock())
            # a lower bound of every route's calibration (fading moves values towards 1), for pruning
            floor = min(1.0, min((v for v, _ in self._calibration.values()), default=1.0))
            c = self._cycle = _Cycle(state, request, self.clock(), request.max_tokens or self.params.default_output_tokens, floor)
            self._recent = {}
        return c

    def _wait(self, key: str, now: float) -> float:
        ends = self._stage.get(key)
        return max(0.0, max(ends.values()) - now) if ends else 0.0

    def _tokens(self, c: _Cycle, e: Endpoint) -> int:
        hit = cached_tokens(c.state, e)
        t = c.request.prompt_tokens
        return max(1, t - hit) if hit else t

    def _prefill_side(self, c: _Cycle, e: Endpoint) -> tuple[float, float]:
        side = c.prefill_side.get(e.key)
        if side is None:
            p = self.params
            tps, _ = unloaded_speeds(e.metrics, len(self._seats.get(e.key, ())), p.default_prefill_tps, p.default_decode_spt, p.batch_slowdown)
            side = c.prefill_side[e.key] = (self._wait(e.key, c.now), self._tokens(c, e) / tps)
        return side

    def _decode_side(self, c: _Cycle, d: Endpoint) -> _DecodeTerms:
        terms = c.decode_side.get(d.key)
        if terms is None:
            p = self.params
            seats = self._seats.get(d.key, {}).values()
            k = len(seats)
            _, spt = unloaded_speeds(d.metrics, k, p.default_prefill_tps, p.default_decode_spt, p.batch_slowdown)
            tail = max(0, c.n - 1) * spt * (1.0 + p.batch_slowdown * k)
            delay = delay_to_others(p.batch_slowdown, seats, c.n, spt, c.now)
            terms = c.decode_side[d.key] = _DecodeTerms(k, spt, tail, delay, self._tokens(c, d))
        return terms

    def _transfer(self, c: _Cycle, p: Endpoint, d: Endpoint, tokens: int) -> tuple[float | None, str]:
        prof, source = self.links.lookup(p, d)
        if prof is None:
            return None, ""
        key = (id(prof), tokens)
        seconds = c.seconds.get(key)
        if seconds is None:
            seconds = c.seconds[key] = prof.seconds_for_tokens(tokens)
        return seconds, source

    # -- estimates --------------------------------------------------------------------------------
    def local(self, state: CycleState, request: LLMRequest, d: Endpoint) -> RouteEstimate:
        """Prefill on the decode pod itself (no disaggregation)."""
        c = self._begin(state, request)
        t = self._decode_side(c, d)
        wait, prefill = self._prefill_side(c, d)
        return self._finish(d.key, d, d, wait, prefill, 0.0, "", t, self.prefill_interference * prefill * t.k)

    def pair(self, state: CycleState, request: LLMRequest, p: Endpoint, d: Endpoint) -> RouteEstimate | None:
        """Prefill on p, KV over the link p → d, decode on d; None when the link is over maxTransferTime."""
        if p is d:
            return self.local(state, request, d)
        c = self._begin(state, request)
        t = self._decode_side(c, d)
        xfer, source = self._transfer(c, p, d, t.tokens)
        if xfer is not None and self.max_transfer is not None and xfer > self.max_transfer:
            return None
        wait, prefill = self._prefill_side(c, p)
        return self._finish(route_key(p, d), p, d, wait, prefill, xfer or 0.0, source, t, 0.0)

    def _finish(self, route: str, p: Endpoint, d: Endpoint, wait: float, prefill: float, xfer: float, source: str,
                t: _DecodeTerms, interference: float) -> RouteEstimate:
        ttft = wait + prefill + xfer + t.spt
        e2e = ttft + t.tail
        delay = t.delay + interference
        c = self.calibration(route)
        est = RouteEstimate(route, p, d, wait, prefill, xfer, source, ttft * c, e2e * c, e2e, delay * c,
                            (e2e + self.params.contention_weight * delay) * c, c)
        self._recent[route] = est
        return est

    def pairs(self, state: CycleState, request: LLMRequest, d: Endpoint, prefills: Iterable[Endpoint]) -> list[RouteEstimate]:
        """Every usable remote route into d (links over maxTransferTime left out)."""
        return [est for p in prefills if p is not d and (est := self.pair(state, request, p, d)) is not None]

    def best_pair_into(self, state: CycleState, request: LLMRequest, d: Endpoint, prefills: Sequence[Endpoint]) -> RouteEstimate | None:
        """The cheapest usable remote route into d, without building an estimate for every pair.

        Prefill pods are visited cheapest prefill side first; once even the calibration floor
        times (their wait + prefill + d's decode terms) cannot beat the best found, the rest
        cannot either (a transfer is never negative).
        """
        c = self._begin(state, request)
        if c.order_of is not prefills:
            c.order = sorted(((sum(self._prefill_side(c, p)), p) for p in prefills), key=lambda x: x[0])
            c.order_of = prefills
        t = self._decode_side(c, d)
        tail = t.spt + t.tail + self.params.contention_weight * t.delay
        best_cost, best_p = math.inf, None
        for pre, p in c.order:
            if c.floor * (pre + tail) >= best_cost:
                break
            if p is d:
                continue
            xfer, _ = self._transfer(c, p, d, t.tokens)
            if xfer is not None and self.max_transfer is not None and xfer > self.max_transfer:
                continue
            cost = self.calibration(route_key(p, d)) * (pre + (xfer or 0.0) + tail)
            if cost < best_cost:
                best_cost, best_p = cost, p
        return None if best_p is None else self.pair(state, request, best_p, d)

    def best_pair_from(self, state: CycleState, request: LLMRequest, p: Endpoint, decodes: Iterable[Endpoint]) -> RouteEstimate | None:
        """The cheapest usable remote route out of p (prefill-first order: one prefill, every decode pod)."""
        return best([est for d in decodes if d is not p and (est := self.pair(state, request, p, d)) is not None])

    # -- bookings ---------------------------------------------------------------------------------
    def book(self, request: LLMRequest, prefill: Endpoint | None, decode: Endpoint) -> RouteEstimate:
        """The request goes this way: its prefill queues on the prefill pod (or the decode pod), then it decodes on `decode`."""
        route = route_key(prefill, decode)
        est = self._recent.get(route)
        if est is None or est.decode_on is not decode:  # not scored this cycle (another plugin chose): estimate now
            state = CycleState()
            est = self.local(state, request, decode) if prefill is None or prefill is decode else self.pair(state, request, prefill, decode)
            if est is None:  # over maxTransferTime, chosen anyway
                c = self._begin(state, request)
                est = self._finish(route, prefill or decode, decode, 0.0, 0.0, 0.0, "", self._decode_side(c, decode), 0.0)
        self.release(request)  # one booking per request
        now = self.clock()
        rid = id(request)
        pre = est.prefill_on.key
        start = now + self._wait(pre, now)
        self._stage.setdefault(pre, {})[rid] = start + est.prefill
        n = request.max_tokens or self.params.default_output_tokens
        self._seats.setdefault(decode.key, {})[rid] = _Seat(start + est.prefill + est.transfer, n)
        self._bookings[rid] = _Booking(pre, decode.key, route, now, est.raw_e2e, request)
        return est

    def release(self, request: LLMRequest, outcome: str = "rescheduled") -> None:
        """The request ended. A failed one keeps its place in the queues until its predicted end (a pod
        that fails at once must not look idle) and pulls its route's calibration toward the slowest."""
        b = self._bookings.pop(id(request), None)
        if b is None:
            return
        rid = id(request)
        now = self.clock()
        end = b.routed_at + b.predicted
        held = next(self._held_ids) if outcome == "error" and end > now else None
        for table, key in ((self._stage, b.prefill_key), (self._seats, b.decode_key)):
            entries = table.get(key)
            if entries is not None:
                value = entries.pop(rid, None)
                if held is not None and value is not None:
                    entries[held] = value
                if not entries:
                    del table[key]
        if held is not None:
            heapq.heappush(self._held, (end, held, b.prefill_key, b.decode_key))
        if outcome == "success" and b.predicted > 0:
            self._calibration[b.route] = (calibrated(self.calibration(b.route), now - b.routed_at, b.predicted), now)
        elif outcome == "error":
            self._calibration[b.route] = (penalised(self.calibration(b.route)), now)

    def _drop_held(self, now: float) -> None:
        held = self._held
        while held and held[0][0] <= now:
            _, rid, prefill_key, decode_key = heapq.heappop(held)
            for table, key in ((self._stage, prefill_key), (self._seats, decode_key)):
                entries = table.get(key)
                if entries is not None:
                    entries.pop(rid, None)
                    if not entries:
                        del table[key]

    def calibration(self, route: str) -> float:
        """The route's observed / predicted ratio, faded towards 1 by the time since it was last observed."""
        entry = self._calibration.get(route)
        if entry is None:
            return 1.0
        value, when = entry
        age = self.clock() - when
        return value if age <= 0 else 1.0 + (value - 1.0) * 0.5 ** (age / self.half_life)

    def forget_endpoint(self, endpoint: Endpoint) -> None:
        key = endpoint.key
        self._stage.pop(key, None)
        self._seats.pop(key, None)
        for route in [r for r in self._calibration if r == key or r.startswith(key + "->") or r.endswith("->" + key)]:
            del self._calibration[route]

    def booked(self) -> int:
        return len(self._bookings)


def pair_model_from(name: str, parameters: Mapping[str, Any], ctx: PluginContext, extra: tuple[str, ...] = ()) -> PairLatencyModel:
    """A pair model from a plugin's parameters (shared with cost-based-pd-decider when it owns one)."""
    reject_unknown(name, parameters, (*PARAMETERS, "prefillInterference", "maxTransferTime", "calibrationHalfLife", *extra))
    interference = parameters.get("prefillInterference", 1.0)
    if not isinstance(interference, (int, float)) or isinstance(interference, bool) or interference < 0:
        raise ConfigError(f"plugin {name!r}: prefillInterference must be a number >= 0, got {interference!r}")
    max_transfer = positive_duration(name, parameters, "maxTransferTime", 1) if "maxTransferTime" in parameters else None
    model = PairLatencyModel(latency_params(name, parameters, ctx), links_of(ctx), prefill_interference=float(interference),
                             max_transfer=max_transfer, half_life=positive_duration(name, parameters, "calibrationHalfLife", "60s"))
    if ctx.datastore is not None:
        ctx.datastore.on_removal(model.forget_endpoint)
    return model



def best(estimates: Sequence[RouteEstimate]) -> RouteEstimate | None:
    return min(estimates, key=lambda e: e.cost, default=None)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2) if math.isfinite(seconds) else seconds
