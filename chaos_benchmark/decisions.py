"""The EPP's log as a timeline: which endpoint each request was routed to, and when."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterable


@dataclass(frozen=True)
class Pick:
    at: float  # epoch seconds
    request_id: str
    endpoint: str  # the endpoint's name (selected_name)
    excluded: tuple[str, ...] = ()  # endpoints endpoint health had left out
    panic: bool = False


@dataclass(frozen=True)
class HealthEvent:
    at: float
    endpoint: str
    event: str  # Endpoint ejected | Endpoint unready | Endpoint ready | Endpoint half-open | Endpoint re-admitted
    detail: str


def _epoch(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def read_log(lines: Iterable[str]) -> tuple[list[Pick], list[HealthEvent]]:
    picks, events = [], []
    for line in lines:
        if not line.startswith("{"):
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        msg, ts = ev.get("msg"), ev.get("ts")
        if not ts:
            continue
        if msg == "Scoring decision":
            picks.append(Pick(_epoch(ts), str(ev.get("request_id", "")), str(ev.get("selected_name", "")),
                              tuple(ev.get("excluded") or ()), bool(ev.get("health_panic"))))
        elif isinstance(msg, str) and msg.startswith("Endpoint "):
            detail = ev.get("detail") or ev.get("readiness") or ev.get("reason") or ev.get("after") or ""
            events.append(HealthEvent(_epoch(ts), str(ev.get("endpoint", "")), msg, str(detail)))
    return picks, events


def read_file(path: Path, since: float = 0.0) -> tuple[list[Pick], list[HealthEvent]]:
    """Picks and health events logged at or after `since` (epoch seconds)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        picks, events = read_log(f)
    return [p for p in picks if p.at >= since], [e for e in events if e.at >= since]
