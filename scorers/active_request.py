"""active-request-scorer: prefers endpoints with fewer requests in flight through this EPP.

Counts rise when a request is scheduled (PreRequest, for every endpoint any profile picked)
and fall exactly once when it ends: response done, client disconnect, stream reset, or the
`requestTimeout` safety net for requests whose end was never seen.

A request that failed (a 5xx, or the gateway could not reach the endpoint) keeps its slot for
`failurePenalty` more: a backend that fails in a millisecond would otherwise look idle and win
every pick. A client's 4xx or a disconnect is not held against the endpoint.
"""

from __future__ import annotations

import heapq
import itertools
import time
from typing import Any, Callable, Mapping, Sequence

from epp.datastore.endpoint import Endpoint
from epp.scheduling.framework import ConfigError, CycleState, LLMRequest, SchedulingResult
from epp.scheduling.registry import PluginContext, positive_duration, register

DEFAULT_REQUEST_TIMEOUT = 120.0
DEFAULT_FAILURE_PENALTY = 5.0


class ActiveRequestScorer:
    type_name = "active-request-scorer"

    def __init__(
        self,
        name: str,
        *,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        idle_threshold: int = 0,
        max_busy_score: float = 1.0,
        failure_penalty: float = DEFAULT_FAILURE_PENALTY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.request_timeout = request_timeout
        self.failure_penalty = failure_penalty
        self._held: list[tuple[float, int, tuple[str, ...]]] = []  # heap: (release at, seq, keys) of failed requests
        self._seq = itertools.count()
        self.idle_threshold = idle_threshold
        self.max_busy_score = max_busy_score
        self.clock = clock
        self.counts: dict[str, int] = {}
        self._inflight: dict[int, tuple[tuple[str, ...], float, LLMRequest]] = {}  # id(request) -> (keys, deadline, request)
        self._next_purge = clock() + request_timeout

    # -- scoring ----------------------------------------------------------------------------------
    def score(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        now = self.clock()
        if now >= self._next_purge:
            self.purge_expired()
        held = self._held
        while held and held[0][0] <= now:
            self._release(heapq.heappop(held)[2])
        counts = self.counts
        if not counts:
            return [1.0] * len(endpoints)
        max_count = max(counts.values())  # over every tracked endpoint, as the Go plugin does
        idle, scale, get = self.idle_threshold, self.max_busy_score / max_count, counts.get
        return [1.0 if (c := get(e.key, 0)) <= idle else (max_count - c) * scale for e in endpoints]

    # -- lifecycle --------------------------------------------------------------------------------
    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        keys = tuple({e.key: None for r in result.profile_results.values() for e in r.targets})
        if not keys or id(request) in self._inflight:
            return
        # the entry holds the request itself so its id cannot be reused while it is tracked
        self._inflight[id(request)] = (keys, self.clock() + self.request_timeout, request)
        for k in keys:
            self.counts[k] = self.counts.get(k, 0) + 1

    def response_complete(self, request: LLMRequest, result: SchedulingResult, outcome: str) -> None:
        entry = self._inflight.pop(id(request), None)
        if entry is None:
            return
        if outcome == "error" and self.failure_penalty > 0:
            heapq.heappush(self._held, (self.clock() + self.failure_penalty, next(self._seq), entry[0]))
        else:
            self._release(entry[0])

    def purge_expired(self) -> int:
        now = self.clock()
        expired = [rid for rid, (_, deadline, _r) in self._inflight.items() if deadline <= now]
        for rid in expired:
            self._release(self._inflight.pop(rid)[0])
        self._next_purge = now + min(self.request_timeout, 10.0)
        return len(expired)

    def forget_endpoint(self, endpoint: Endpoint) -> None:
        self.counts.pop(endpoint.key, None)

    def in_flight(self) -> int:
        return len(self._inflight)

    def _release(self, keys: tuple[str, ...]) -> None:
        for k in keys:
            c = self.counts.get(k, 0) - 1
            if c > 0:
                self.counts[k] = c
            else:
                self.counts.pop(k, None)


@register("active-request-scorer")
def _factory(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> ActiveRequestScorer:
    timeout = positive_duration(name, parameters, "requestTimeout", DEFAULT_REQUEST_TIMEOUT)
    idle = parameters.get("idleThreshold", 0)
    if not isinstance(idle, int) or isinstance(idle, bool) or idle < 0:
        raise ConfigError(f"plugin {name!r}: idleThreshold must be an integer >= 0, got {idle!r}")
    busy = parameters.get("maxBusyScore", 1.0)
    if not isinstance(busy, (int, float)) or isinstance(busy, bool) or not 0.0 <= busy <= 1.0:
        raise ConfigError(f"plugin {name!r}: maxBusyScore must be a number in [0, 1], got {busy!r}")
    penalty = parameters.get("failurePenalty", DEFAULT_FAILURE_PENALTY)
    penalty = 0.0 if penalty in (0, "0", "0s") else positive_duration(name, parameters, "failurePenalty", DEFAULT_FAILURE_PENALTY)
    scorer = ActiveRequestScorer(name, request_timeout=timeout, idle_threshold=idle, max_busy_score=float(busy), failure_penalty=penalty)
    if ctx.datastore is not None:
        ctx.datastore.on_removal(scorer.forget_endpoint)
    return scorer
