"""P/D cluster runs: which (prefill, decode) route each request took, read from the EPP's decision log.

A route is `prefill->decode`, or `local->decode` when the decode pod prefilled itself. For a run
with a link degraded at run time, the share of requests on that link before and after, and how
long after the change the EPP still sent requests over it.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

SETTLE_S = 3.0  # "after" counts from this long past the change: the requests already on their way are not the EPP's choice
MOVED_SHARE = 0.05  # "moved off": from then on, at most this share of the requests still take the link …
MOVED_MIN_REQUESTS = 10  # … over at least this many requests (a run's last few say nothing)


@dataclass
class Degrade:
    prefill: str
    decode: str
    factor: float
    at_s: float  # seconds after the run's start

    @classmethod
    def parse(cls, spec: str) -> "Degrade":
        try:
            prefill, decode, factor, at = spec.split(",")
            return cls(prefill.strip(), decode.strip(), float(factor), float(at))
        except ValueError:
            raise ValueError(f"--degrade-link {spec!r}: expected PREFILL,DECODE,FACTOR,AT_SECONDS, e.g. prefill-a,decode-a,0.005,8") from None

    @property
    def route(self) -> str:
        return f"{self.prefill}->{self.decode}"

    def schedule(self, workdir: Path, start_wall: float, applied: list) -> threading.Timer:
        """Degrade the link `at_s` after `start_wall` (time.time()); the wall time it happened goes into `applied`."""
        import time

        from local_stack.cluster_stack import degrade_link

        def go() -> None:
            degrade_link(workdir, self.prefill, self.decode, self.factor)
            applied.append(time.time())

        timer = threading.Timer(max(0.0, start_wall + self.at_s - time.time()), go)
        timer.daemon = True
        timer.start()
        return timer


def _ts(s: str) -> float:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def routes(epp_log: Path, names: dict[str, str], start_wall: float, end_wall: float) -> list[tuple[float, str]]:
    """(wall time, route) of every decision in [start, end]; `names` maps endpoint host:port to pod names."""
    out = []
    for line in epp_log.read_text(errors="replace").splitlines():
        if '"Scoring decision"' not in line:
            continue
        try:
            d = json.loads(line)
            at = _ts(d["ts"])
        except (ValueError, KeyError):
            continue
        if not start_wall <= at <= end_wall:
            continue
        decode = names.get((d.get("selected") or ["?"])[0], "?")
        prefill = (d.get("request_headers") or {}).get("x-prefiller-host-port")
        out.append((at, f"{names.get(prefill, prefill) if prefill else 'local'}->{decode}"))
    return out


def summarize_routes(taken: list[tuple[float, str]], degrade: Degrade | None = None, degraded_at: float | None = None) -> dict:
    out: dict = {"routes": dict(Counter(r for _, r in taken).most_common())}
    if degrade is not None and degraded_at is not None:
        before = [r for t, r in taken if t < degraded_at]
        after = [r for t, r in taken if t >= degraded_at + SETTLE_S]
        on_link_after = [t for t, r in taken if r == degrade.route and t >= degraded_at]
        out["degraded"] = {
            "route": degrade.route, "factor": degrade.factor,
            "share_before": sum(r == degrade.route for r in before) / len(before) if before else None,
            "share_after": sum(r == degrade.route for r in after) / len(after) if after else None,
            "requests_after": len(after),
            "last_use_after_s": round(max(on_link_after) - degraded_at, 2) if on_link_after else 0.0,
            "moved_off_after_s": moved_off(taken, degrade.route, degraded_at),
            "timeline": timeline(taken, degrade.route, degraded_at),
        }
    return out


def moved_off(taken: list[tuple[float, str]], route: str, at: float) -> float | None:
    """Seconds after `at` from which at most MOVED_SHARE of the (at least MOVED_MIN_REQUESTS) requests took `route`
    (None: not before the run's last requests)."""
    after = [(t - at, r == route) for t, r in taken if t >= at]
    for i, (t, _) in enumerate(after[:max(0, len(after) - MOVED_MIN_REQUESTS + 1)]):
        rest = after[i:]
        if sum(on for _, on in rest) <= MOVED_SHARE * len(rest):
            return round(max(0.0, t), 2)
    return None


def timeline(taken: list[tuple[float, str]], route: str, at: float, step: float = 1.0) -> list[list[float]]:
    """[[seconds after `at` (bin start), requests on `route`, all requests]] per `step`."""
    bins: dict[int, list[int]] = {}
    for t, r in taken:
        b = bins.setdefault(int((t - at) // step), [0, 0])
        b[0] += r == route
        b[1] += 1
    return [[k * step, v[0], v[1]] for k, v in sorted(bins.items())]
