"""Which prefill and decode instances may take a request: health checks, outlier ejection, stalls.

An instance is *down* while its `/health` fails or it refuses connections, and back as soon as
`/health` passes again (a process that came back is a new engine: any ejection is cleared too).
It is *ejected* after `consecutive_failures` failed calls in a row (5xx, a connection lost
mid-response, a timeout, a KV transfer to it that failed) or when it holds calls but shows no
progress for `stall_timeout` — a hung engine still passes `/health`. An ejection lasts
`base_ejection` × the number of times it was ejected, capped at `max_ejection`, as in Envoy's
outlier detection (the count starts over once it has served `max_ejection` seconds without one);
then one call probes it (half-open) and a success re-admits it. Requests go to the least-loaded
instance that is up; when none is, they fail at once with the reasons.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable
from urllib.parse import urlsplit

FAILURE_KINDS = ("connect", "reset", "5xx", "timeout", "stall", "kv", "health")  # bounded: metric label values


@dataclass
class HealthPolicy:
    consecutive_failures: int = 3
    base_ejection: float = 2.0
    max_ejection: float = 30.0
    health_timeout: float = 2.0
    stall_timeout: float = 30.0  # 0 = never declare a stall


class Leg:
    """One request's call to one instance, run as a task so a hung instance can end it (`abort`)."""

    def __init__(self, task: asyncio.Task | None = None) -> None:
        self.task = task
        self.abort_reason: str | None = None
        self.failure: tuple[str, str] | None = None  # (kind, reason) of a call that failed after its answer began

    def abort(self, reason: str) -> None:
        self.abort_reason = reason
        if self.task is not None:
            self.task.cancel()


@dataclass(eq=False)
class InstanceHealth:
    down: str | None = None  # why, while /health fails or connections are refused
    down_since: float = 0.0
    ejected_until: float = 0.0  # 0: not ejected; past: half-open, one probe may go
    eject_reason: str = ""
    ejections: int = 0
    last_ejected: float = 0.0
    consecutive: int = 0
    probing: bool = False
    failures: Counter = field(default_factory=Counter)
    legs: set = field(default_factory=set)
    busy_since: float = 0.0
    last_progress: float = 0.0
    progress_mark: float | None = None  # the instance's token counters at the last scrape
    checking: bool = False  # a health probe is under way
    slow_checks: int = 0  # health checks in a row that got no answer in time


@dataclass(eq=False)
class Instance:
    """A prefill or decode vLLM: its HTTP base URL, (p2p-nccl) its KV address, and its health."""

    url: str
    kv_addr: str = ""
    in_flight: int = 0
    health: InstanceHealth = field(default_factory=InstanceHealth, repr=False)

    @classmethod
    def parse(cls, spec: str) -> "Instance":
        """`http://host:port` or `http://host:port=kvhost:kvport`."""
        url, _, kv = spec.partition("=")
        if not url.startswith(("http://", "https://")):
            url = "http://" + url
        return cls(url.rstrip("/"), kv)

    @property
    def address(self) -> str:
        """host:port, the `instance` label of the proxy's per-instance metrics."""
        return urlsplit(self.url).netloc


class HealthTracker:
    """The state machine above, for every instance of one proxy."""

    def __init__(self, policy: HealthPolicy, log: Callable[[Instance, str], None] = lambda inst, msg: print(inst.url, msg),
                 on_suspect: Callable[[Instance], None] = lambda inst: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy, self.log, self.on_suspect, self.clock = policy, log, on_suspect, clock

    # -- state -------------------------------------------------------------------------------------
    def state(self, inst: Instance, now: float | None = None) -> str:
        """up | down | ejected | probe (ejection over, waiting for a call to prove it)."""
        h = inst.health
        if h.down:
            return "down"
        if h.ejected_until:
            return "ejected" if (self.clock() if now is None else now) < h.ejected_until else "probe"
        return "up"

    def usable(self, inst: Instance) -> bool:
        return self.state(inst) in ("up", "probe")

    def pick(self, instances: Iterable[Instance], exclude: Iterable[Instance] = ()) -> Instance | None:
        """The least-loaded instance that is up; else one whose ejection is over and no probe is out."""
        now, skip = self.clock(), set(exclude)
        candidates = [i for i in instances if i not in skip]
        up = [i for i in candidates if self.state(i, now) == "up"]
        if up:
            return min(up, key=lambda i: i.in_flight)
        return next((i for i in candidates if self.state(i, now) == "probe" and not i.health.probing), None)

    def acquire(self, inst: Instance) -> None:
        inst.in_flight += 1
        if self.state(inst) == "probe":
            inst.health.probing = True

    def release(self, inst: Instance) -> None:
        inst.in_flight -= 1
        inst.health.probing = False  # a probe that ended without a verdict (client left) frees the slot

    def why_not(self, instances: Iterable[Instance]) -> str:
        """Why no instance could be picked, for the error a client gets."""
        now = self.clock()
        parts = []
        for i in instances:
            h, st = i.health, self.state(i, now)
            if st == "down":
                parts.append(f"{i.url} down for {now - h.down_since:.1f}s ({h.down})")
            elif st == "ejected":
                parts.append(f"{i.url} ejected for {h.ejected_until - now:.1f}s more ({h.eject_reason})")
            elif st == "probe":
                parts.append(f"{i.url} being probed after an ejection ({h.eject_reason})")
        return "; ".join(parts) or "none registered"

    # -- outcomes of calls -------------------------------------------------------------------------
    def leg_started(self, inst: Instance, leg: Leg) -> None:
        h = inst.health
        if not h.legs:
            h.busy_since = self.clock()
        h.legs.add(leg)

    def leg_ended(self, inst: Instance, leg: Leg) -> None:
        inst.health.legs.discard(leg)
        self.progress(inst)

    def progress(self, inst: Instance) -> None:
        inst.health.last_progress = self.clock()

    def succeeded(self, inst: Instance) -> None:
        h = inst.health
        h.consecutive = 0
        if h.ejected_until and h.probing:
            self.log(inst, f"re-admitted: a probe succeeded after its ejection ({h.eject_reason})")
            h.ejected_until, h.eject_reason = 0.0, ""
        h.probing = False

    def failed(self, inst: Instance, kind: str, reason: str) -> None:
        """A call failed because of this instance; `connect` means it is down right now."""
        h, now = inst.health, self.clock()
        h.failures[kind] += 1
        h.consecutive += 1
        if kind == "connect":
            self.mark_down(inst, reason)
        elif h.probing or (h.ejected_until and now >= h.ejected_until):
            self.eject(inst, f"probe failed: {reason}")
        elif not h.ejected_until and h.consecutive >= self.policy.consecutive_failures:
            self.eject(inst, f"{h.consecutive} failures in a row, the last: {reason}")
        h.probing = False
        self.on_suspect(inst)

    def eject(self, inst: Instance, reason: str) -> None:
        h, now = inst.health, self.clock()
        if h.last_ejected and now - h.last_ejected > self.policy.max_ejection + min(self.policy.max_ejection, self.policy.base_ejection * h.ejections):
            h.ejections = 0  # served a while without one: the multiplier starts over
        h.ejections += 1
        duration = min(self.policy.max_ejection, self.policy.base_ejection * h.ejections)
        h.ejected_until, h.eject_reason, h.last_ejected, h.consecutive = now + duration, reason, now, 0
        self.log(inst, f"ejected for {duration:g}s: {reason}")

    def stalled(self, inst: Instance, now: float | None = None) -> str | None:
        """Why `inst` counts as hung: calls out, and no progress for the stall timeout."""
        h, limit = inst.health, self.policy.stall_timeout
        if not h.legs or limit <= 0:
            return None
        now = self.clock() if now is None else now
        quiet = now - max(h.last_progress, h.busy_since)
        if quiet <= limit:
            return None
        return f"no progress for {quiet:.1f}s with {len(h.legs)} call(s) in flight (hung engine?)"

    def end_stall(self, inst: Instance, reason: str) -> None:
        """Eject a hung instance and end its calls; each ends with a clear error and counts as a `stall`."""
        h = inst.health
        if not h.ejected_until or self.state(inst) == "probe":
            self.eject(inst, reason)
        for leg in list(h.legs):
            leg.abort(reason)

    # -- active checks -----------------------------------------------------------------------------
    def mark_down(self, inst: Instance, reason: str) -> None:
        h = inst.health
        if not h.down:
            h.down, h.down_since = reason, self.clock()
            self.log(inst, f"down: {reason}")
        else:
            h.down = reason

    def health_result(self, inst: Instance, ok: bool, reason: str = "", slow: bool = False) -> None:
        """A /health answer. `slow`: none came in time — on a loaded machine that alone is not proof, so it takes two."""
        h = inst.health
        if not ok:
            h.failures["health"] += 1
            h.slow_checks = h.slow_checks + 1 if slow else 0
            if not slow or h.slow_checks >= 2:
                self.mark_down(inst, reason)
            return
        h.slow_checks = 0
        if h.down:
            self.log(inst, f"back: /health passes after {self.clock() - h.down_since:.1f}s down ({h.down})")
            h.down, h.ejected_until, h.eject_reason, h.consecutive, h.probing = None, 0.0, "", 0, False

    def counters_moved(self, inst: Instance, mark: float | None) -> None:
        """The instance's token counters at a scrape: a change is progress."""
        h = inst.health
        if mark is not None and h.progress_mark is not None and mark != h.progress_mark:
            self.progress(inst)
        h.progress_mark = mark

    def view(self, role: str, inst: Instance) -> dict:
        """One instance for /health and the metrics."""
        h, now = inst.health, self.clock()
        st = self.state(inst, now)
        out = {"role": role, "instance": inst.address, "url": inst.url, "up": st == "up", "state": st,
               "in_flight": inst.in_flight, "ejections": h.ejections, "failures": dict(h.failures)}
        if st == "down":
            out.update(reason=h.down, down_for_s=round(now - h.down_since, 3))
        elif st in ("ejected", "probe"):
            out.update(reason=h.eject_reason, ejected_for_s=round(max(0.0, h.ejected_until - now), 3))
        return out
