"""predicted-latency-scorer: prefer the endpoint predicted to finish this request first.

For each candidate endpoint e, this request's prompt of t tokens and its n output tokens:

    TTFT(e) = wait(e) + t / prefill_tps(e) + transfer(e, t) + decode_spt(e)
    E2E(e)  = TTFT(e) + (n − 1) × decode_spt(e) × (1 + batchSlowdown × inflight(e))

* transfer(e, t): the endpoint's measured KV-transfer profile at t tokens (0 without a profile);
* prefill_tps, decode_spt: the proxy's measured prefill speed and time per output token
  (`pdproxy_prefill_tokens_per_second`, `pdproxy_decode_seconds_per_token`), or the plugin's
  defaults until the endpoint has measured them;
* inflight(e): requests this EPP has routed to e and not yet seen finish; the decode batch
  grows with it and each token slows by `batchSlowdown` per extra sequence (default 0.05);
* n: the request's max_tokens, or `defaultOutputTokens` when it does not say;
* wait(e): how long work this EPP already sent to e keeps its prefill-and-transfer stage busy.
  Every scheduled request pushes e's `busy_until` by its own prefill + transfer estimate, so the
  queue is known the moment a request is routed — no scrape lag, which matters in bursts.
  A pair prefills one prompt at a time and its link is FIFO, so the stage is serial. The work is
  forgotten when its response completes or the estimate has passed, whichever comes first.

The model calibrates itself per endpoint: when a request it routed completes, the observed
duration over the prediction made at routing time feeds an EWMA `calibration(e)` (clamped to
[0.5, 3]), and predictions for *e* are multiplied by it. Whatever the model misses on a given
pair — a decode batch that slows more than `batchSlowdown` says, a busy host — shows up there
and moves traffic.

Score = min over candidates of E2E / E2E(e): the predicted-fastest endpoint scores 1, one
predicted twice as slow 0.5. TTFT alone would pile every request on the fastest fabric until
its decode batch, not its link, becomes the bottleneck; E2E keeps both in view. The estimates
(TTFT, E2E, queue wait) appear in the decision log.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

from epp.datastore.endpoint import Endpoint
from epp.scheduling.estimates import transfer_estimates
from epp.scheduling.framework import ConfigError, CycleState, LLMRequest, SchedulingResult
from epp.scheduling.registry import PluginContext, register

STATE_KEY = "predicted-latency"
CALIBRATION_ALPHA = 0.1


class PredictedLatencyScorer:
    type_name = "predicted-latency-scorer"
    needs_metrics = True

    def __init__(self, name: str, default_prefill_tps: float, default_decode_spt: float, clock: Callable[[], float] = time.monotonic,
                 batch_slowdown: float = 0.05, default_output_tokens: int = 64) -> None:
        self.name = name
        self.batch_slowdown = batch_slowdown
        self.default_output_tokens = default_output_tokens
        self._inflight: dict[str, set[int]] = {}
        self.calibration: dict[str, float] = {}  # endpoint key -> EWMA of observed / predicted E2E
        self._predicted: dict[int, tuple[str, float, float]] = {}  # id(request) -> (endpoint key, routed at, predicted E2E)
        self._last_estimates: dict[str, dict[str, float]] | None = None
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
            ttft = wait + prefill + xfer + spt
            n = request.max_tokens or self.default_output_tokens
            decode = max(0, n - 1) * spt * (1.0 + self.batch_slowdown * len(self._inflight.get(e.key, ())))
            k = self.calibration.get(e.key, 1.0)
            out[e.key] = {"wait": wait, "prefill": prefill, "transfer": xfer, "first_token": spt, "ttft": ttft * k,
                          "e2e": (ttft + decode) * k, "calibration": k}
        state.write(STATE_KEY, out)
        self._last_estimates = out  # the cycle's estimates, for PreRequest of the same cycle
        return out

    def score(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        est = self.estimate(state, request, endpoints)
        best = min((v["e2e"] for v in est.values()), default=0.0)
        state.notes[self.name] = {"ttft_ms": {k: round(v["ttft"] * 1000, 2) for k, v in est.items()},
                                  "e2e_ms": {k: round(v["e2e"] * 1000, 2) for k, v in est.items()},
                                  "calibration": {k: round(v["calibration"], 3) for k, v in est.items() if v["calibration"] != 1.0},
                                  "wait_ms": {k: round(v["wait"] * 1000, 2) for k, v in est.items() if v["wait"] > 0}}
        return [1.0 if best <= 0 else best / est[e.key]["e2e"] for e in endpoints]

    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        """Book the chosen endpoint's stage: this request's prefill + transfer run after what is queued."""
        target = result.targets[0]
        now = self.clock()
        prefill = request.prompt_tokens / (target.metrics.prefill_tokens_per_second or self.default_prefill_tps)
        prof = target.metrics.transfer_profile
        xfer = prof.seconds_for_tokens(request.prompt_tokens) if prof is not None else 0.0
        start = now + self._wait(target.key, now)
        self._stage.setdefault(target.key, {})[id(request)] = (start, start + prefill + xfer, request)
        self._inflight.setdefault(target.key, set()).add(id(request))
        predicted = (self._last_estimates or {}).get(target.key)
        if predicted is not None:
            self._predicted[id(request)] = (target.key, now, predicted["e2e"] / predicted.get("calibration", 1.0))

    def response_complete(self, request: LLMRequest, result: SchedulingResult, outcome: str) -> None:
        entry = self._predicted.pop(id(request), None)
        if entry is not None and outcome == "success":
            key, routed_at, predicted = entry
            if predicted > 0:
                ratio = min(3.0, max(0.5, (self.clock() - routed_at) / predicted))
                old = self.calibration.get(key, 1.0)
                self.calibration[key] = (1 - CALIBRATION_ALPHA) * old + CALIBRATION_ALPHA * ratio
        for work in self._stage.values():
            work.pop(id(request), None)
        for ids in self._inflight.values():
            ids.discard(id(request))

    def forget_endpoint(self, endpoint: Endpoint) -> None:
        self._stage.pop(endpoint.key, None)
        self._inflight.pop(endpoint.key, None)
        self.calibration.pop(endpoint.key, None)


def _positive(name: str, field: str, v: Any) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"plugin {name!r}: {field} must be a positive number, got {v!r}")
    return float(v)


@register("predicted-latency-scorer")
def _factory(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> PredictedLatencyScorer:
    slowdown = parameters.get("batchSlowdown", 0.05)
    if not isinstance(slowdown, (int, float)) or isinstance(slowdown, bool) or slowdown < 0:
        raise ConfigError(f"plugin {name!r}: batchSlowdown must be a number >= 0, got {slowdown!r}")
    s = PredictedLatencyScorer(
        name,
        _positive(name, "defaultPrefillTokensPerSecond", parameters.get("defaultPrefillTokensPerSecond", 20000.0)),
        _positive(name, "defaultDecodeSecondsPerToken", parameters.get("defaultDecodeSecondsPerToken", 0.01)),
        batch_slowdown=float(slowdown),
        default_output_tokens=int(_positive(name, "defaultOutputTokens", parameters.get("defaultOutputTokens", 64))),
    )
    if ctx.datastore is not None:
        ctx.datastore.on_removal(s.forget_endpoint)
    return s
