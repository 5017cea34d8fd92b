"""predicted-latency-scorer: prefer the endpoint with the smallest estimated time to first token.

For each candidate endpoint e and this request's prompt of t tokens:

    TTFT(e) = wait(e) + t / prefill_tps(e) + transfer(e, t) + decode_spt(e)

* transfer(e, t): the endpoint's measured KV-transfer profile at t tokens (0 without a profile);
* prefill_tps, decode_spt: the proxy's measured prefill speed and time per output token
  (`pdproxy_prefill_tokens_per_second`, `pdproxy_decode_seconds_per_token`), or the plugin's
  defaults until the endpoint has measured them;
* wait(e): how long work this EPP already sent to e keeps its prefill-and-transfer stage busy.
  Every scheduled request pushes e's `busy_until` by its own prefill + transfer estimate, so the
  queue is known the moment a request is routed — no scrape lag, which matters in bursts.
  A pair prefills one prompt at a time and its link is FIFO, so the stage is serial. The work is
  forgotten when its response completes or the estimate has passed, whichever comes first.

Score = min over candidates of TTFT / TTFT(e): the predicted-fastest endpoint scores 1, one
predicted twice as slow 0.5. The estimates appear in the decision log.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

from epp.datastore.endpoint import Endpoint
from epp.scheduling.estimates import transfer_estimates
from epp.scheduling.framework import ConfigError, CycleState, LLMRequest, SchedulingResult
from epp.scheduling.registry import PluginContext, register

STATE_KEY = "predicted-latency"


class PredictedLatencyScorer:
    type_name = "predicted-latency-scorer"
    needs_metrics = True

    def __init__(self, name: str, default_prefill_tps: float, default_decode_spt: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.default_prefill_tps = default_prefill_tps
        self.default_decode_spt = default_decode_spt
        self.clock = clock
        # endpoint key -> id(request) -> (stage start, stage end, request) for work still occupying the stage
        self._stage: dict[str, dict[int, tuple[float, float, LLMRequest]]] = {}

    def _wait(self, key: str, now: float) -> float:
        """Seconds until the endpoint's serial prefill+transfer stage is free, from this EPP's own routing."""
        work = self._stage.get(key)
        if not work:
            return 0.0
        for rid in [r for r, (_, end, _req) in work.items() if end <= now]:
            del work[rid]
        return max((end for _, end, _r in work.values()), default=now) - now

    def estimate(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> dict[str, dict[str, float]]:
        now = self.clock()
        transfer = transfer_estimates(state, request, endpoints)
        out = {}
        for e in endpoints:
            m = e.metrics
            tps = m.prefill_tokens_per_second or self.default_prefill_tps
            spt = m.decode_seconds_per_token or self.default_decode_spt
            prefill = request.prompt_tokens / tps
            xfer = transfer.get(e.key, 0.0)
            wait = self._wait(e.key, now)
            out[e.key] = {"wait": wait, "prefill": prefill, "transfer": xfer, "first_token": spt, "ttft": wait + prefill + xfer + spt}
        state.write(STATE_KEY, out)
        return out

    def score(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        est = self.estimate(state, request, endpoints)
        best = min((v["ttft"] for v in est.values()), default=0.0)
        state.notes[self.name] = {"ttft_ms": {k: round(v["ttft"] * 1000, 2) for k, v in est.items()},
                                  "wait_ms": {k: round(v["wait"] * 1000, 2) for k, v in est.items() if v["wait"] > 0}}
        return [1.0 if best <= 0 else best / est[e.key]["ttft"] for e in endpoints]

    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        """Book the chosen endpoint's stage: this request's prefill + transfer run after what is queued."""
        target = result.targets[0]
        now = self.clock()
        prefill = request.prompt_tokens / (target.metrics.prefill_tokens_per_second or self.default_prefill_tps)
        prof = target.metrics.transfer_profile
        xfer = prof.seconds_for_tokens(request.prompt_tokens) if prof is not None else 0.0
        start = now + self._wait(target.key, now)
        self._stage.setdefault(target.key, {})[id(request)] = (start, start + prefill + xfer, request)

    def response_complete(self, request: LLMRequest, result: SchedulingResult, outcome: str) -> None:
        for work in self._stage.values():
            work.pop(id(request), None)

    def forget_endpoint(self, endpoint: Endpoint) -> None:
        self._stage.pop(endpoint.key, None)


def _positive(name: str, field: str, v: Any) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"plugin {name!r}: {field} must be a positive number, got {v!r}")
    return float(v)


@register("predicted-latency-scorer")
def _factory(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> PredictedLatencyScorer:
    s = PredictedLatencyScorer(
        name,
        _positive(name, "defaultPrefillTokensPerSecond", parameters.get("defaultPrefillTokensPerSecond", 20000.0)),
        _positive(name, "defaultDecodeSecondsPerToken", parameters.get("defaultDecodeSecondsPerToken", 0.01)),
    )
    if ctx.datastore is not None:
        ctx.datastore.on_removal(s.forget_endpoint)
    return s
