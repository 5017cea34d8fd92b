"""The latency model the predicted-latency scorers share: speeds, batch slowdown, delay to others, calibration.

`predicted-latency-scorer` (one endpoint = one P/D proxy) and `pd-pair-latency-scorer` (a
prefill pod and a decode pod chosen as a pair) predict the same quantities from the same
measurements; only what they book where differs. The formulas live here once:

* unloaded speeds: the measured prefill speed, and the measured time per output token divided
  by the slowdown of the batch it was measured in (`1 + batchSlowdown × (k − 1)`);
* delay to others: joining a decode batch slows each member's remaining tokens by
  `batchSlowdown × spt` for as long as both decode;
* calibration: an EWMA per route of observed / predicted end-to-end time, clamped to [0.5, 3],
  learnt from successes only; a failure moves it toward 3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Protocol

from epp.datastore.endpoint import EndpointMetrics
from epp.scheduling.framework import ConfigError
from epp.scheduling.registry import PluginContext

CALIBRATION_ALPHA = 0.1
CALIBRATION_RANGE = (0.5, 3.0)
FAILURE_ALPHA = 0.3  # each failed request moves a route's calibration this far toward the maximum


class Seat(Protocol):
    """A request in (or about to join) a decode batch."""

    stage_end: float  # when it starts decoding: its prefill (and transfer) done
    output_tokens: int


@dataclass(frozen=True, slots=True)
class LatencyParams:
    default_prefill_tps: float = 20000.0
    default_decode_spt: float = 0.01
    batch_slowdown: float = 0.05
    default_output_tokens: int = 64
    contention_weight: float = 1.0
    staleness: float = 2.0  # metrics older than this are still used, and named in the decision log


PARAMETERS = ("defaultPrefillTokensPerSecond", "defaultDecodeSecondsPerToken", "batchSlowdown", "defaultOutputTokens", "contentionWeight")


def number(name: str, field: str, v: Any, *, positive: bool) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or (positive and v == 0):
        raise ConfigError(f"plugin {name!r}: {field} must be a {'positive number' if positive else 'number >= 0'}, got {v!r}")
    return float(v)


def latency_params(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> LatencyParams:
    p = parameters.get
    return LatencyParams(
        number(name, "defaultPrefillTokensPerSecond", p("defaultPrefillTokensPerSecond", 20000.0), positive=True),
        number(name, "defaultDecodeSecondsPerToken", p("defaultDecodeSecondsPerToken", 0.01), positive=True),
        number(name, "batchSlowdown", p("batchSlowdown", 0.05), positive=False),
        int(number(name, "defaultOutputTokens", p("defaultOutputTokens", 64), positive=True)),
        number(name, "contentionWeight", p("contentionWeight", 1.0), positive=False),
        float((ctx.services or {}).get("metrics_staleness", 2.0)),
    )


def unloaded_speeds(metrics: EndpointMetrics, k: int, default_tps: float, default_spt: float, batch_slowdown: float) -> tuple[float, float]:
    """(prefill tokens/s, seconds per output token alone) of an endpoint with k requests in its batch."""
    tps = metrics.prefill_tokens_per_second or default_tps
    spt = metrics.decode_seconds_per_token
    spt = spt / (1.0 + batch_slowdown * max(0, k - 1)) if spt else default_spt
    return tps, spt


def delay_to_others(batch_slowdown: float, seats: Iterable[Seat], n: int, spt: float, now: float) -> float:
    """Extra seconds a request decoding n tokens adds to the requests already decoding (or about to) beside it."""
    seats = list(seats)
    if not seats or batch_slowdown <= 0:
        return 0.0
    per_token = spt * (1.0 + batch_slowdown * (len(seats) - 1))
    total = 0.0
    for f in seats:
        decoding_since = f.stage_end + spt
        done = (now - decoding_since) / per_token if now > decoding_since else 0.0
        total += min(max(0.0, f.output_tokens - done), n - 1)
    return batch_slowdown * spt * total


def calibrated(old: float, observed: float, predicted: float) -> float:
    """One EWMA step of the observed / predicted ratio (clamped, so one outlier cannot swing routing)."""
    lo, hi = CALIBRATION_RANGE
    ratio = min(hi, max(lo, observed / predicted))
    return (1 - CALIBRATION_ALPHA) * old + CALIBRATION_ALPHA * ratio


def penalised(old: float) -> float:
    """A failed request's step: toward the slowest calibration. A failure ends fast, and learning from
    its duration would make a broken route look like the quickest there is."""
    return (1 - FAILURE_ALPHA) * old + FAILURE_ALPHA * CALIBRATION_RANGE[1]
