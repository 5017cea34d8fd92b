"""From outcomes, picks and a fault schedule to the figures the issue asks for, a table and a timeline PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from chaos_benchmark.client import ANSWERED, CLEAR_ERROR, HUNG, LOST, OUTCOMES, Sent
from chaos_benchmark.decisions import HealthEvent, Pick

COLOURS = {ANSWERED: "tab:green", CLEAR_ERROR: "tab:orange", HUNG: "tab:red", LOST: "tab:purple"}
NOT_ROUTED = "(not routed)"


def analyse(sent: Sequence[Sent], picks: Sequence[Pick], events: Sequence[HealthEvent], start: float, dead: str,
            kill_at: float, restart_at: float | None, interval: float, recovery: Sequence[Sent] = (),
            back_at: float | None = None) -> dict:
    """Figures of one run; times are seconds from the start of the load.

    `recovery`: requests sent after the load only to time the restarted endpoint's first 200;
    `back_at`: when the restarted process answered its /health again.
    """
    by_rid = {p.request_id: p for p in picks}
    rel = lambda t: round(t - start, 3)  # noqa: E731
    def row(s: Sent) -> dict:
        p = by_rid.get(s.request_id)
        return {"index": s.index, "request_id": s.request_id, "sent": rel(s.sent_at), "routed_at": rel(p.at) if p else None,
                "first_byte": rel(s.first_byte_at) if s.first_byte_at else None, "ended": rel(s.ended_at),
                "endpoint": p.endpoint if p else "", "outcome": s.outcome, "status": s.status, "error": s.error,
                "prompt_tokens": s.prompt_tokens, "output_tokens": s.output_tokens}

    rows = [row(s) for s in sent]
    counts = {o: sum(1 for r in rows if r["outcome"] == o) for o in OUTCOMES}
    failed = len(rows) - counts[ANSWERED]
    end_of_outage = restart_at if restart_at is not None else float("inf")
    in_flight = [r for r in rows if r["endpoint"] == dead and r["sent"] < kill_at < r["ended"]]
    excused = sum(1 for r in in_flight if r["outcome"] != ANSWERED)
    dead_picks = [rel(p.at) for p in picks if p.endpoint == dead and kill_at <= rel(p.at) < end_of_outage]
    dead_failures = sorted(r["ended"] for r in rows if r["endpoint"] == dead and r["outcome"] != ANSWERED and r["ended"] >= kill_at)
    first_failure = dead_failures[0] if dead_failures else None
    last_pick = max(dead_picks) if dead_picks else None
    bound = kill_at + 2 * interval
    if first_failure is not None:
        bound = min(bound, first_failure)
    out = {
        "requests": len(rows),
        **counts,
        "failed": failed,
        "failed_pct": round(100.0 * failed / len(rows), 2) if rows else 0.0,
        "in_flight_on_dead_at_kill": len(in_flight),
        "failed_in_flight_at_kill": excused,
        "failed_beyond_in_flight": failed - excused,
        "failed_beyond_in_flight_pct": round(100.0 * (failed - excused) / len(rows), 2) if rows else 0.0,
        "dead_endpoint": dead,
        "dead_picks_during_outage": len(dead_picks),
        "dead_share_during_outage": round(len(dead_picks) / max(1, sum(1 for p in picks if kill_at <= rel(p.at) < end_of_outage)), 3),
        "first_failure_after_kill_s": round(first_failure - kill_at, 3) if first_failure is not None else None,
        "last_pick_after_kill_s": round(last_pick - kill_at, 3) if last_pick is not None else None,
        "picks_after_bound": sum(1 for t in dead_picks if t > bound),
        "pick_bound_after_kill_s": round(bound - kill_at, 3),
    }
    if restart_at is not None:
        extra = [row(s) for s in recovery]
        back = [r for r in rows + extra if r["endpoint"] == dead and r["routed_at"] is not None and r["routed_at"] >= restart_at]
        ok = sorted(r["ended"] for r in back if r["outcome"] == ANSWERED)
        out["first_pick_after_restart_s"] = round(min(r["routed_at"] for r in back) - restart_at, 3) if back else None
        out["first_200_after_restart_s"] = round(ok[0] - restart_at, 3) if ok else None
        out["process_answering_after_restart_s"] = round(back_at - restart_at, 3) if back_at is not None else None
        out["first_200_after_back_s"] = round(ok[0] - back_at, 3) if ok and back_at is not None else None
        out["failed_after_restart_on_dead"] = sum(1 for r in back if r["outcome"] != ANSWERED)
        out["recovery_requests"] = len(extra)
    out["checks"] = {
        "failed_beyond_in_flight_le_1pct": out["failed_beyond_in_flight"] <= 0.01 * len(rows),
        "no_hung": counts[HUNG] == 0,
        "no_lost": counts[LOST] == 0,
        "no_pick_after_bound": out["picks_after_bound"] == 0,
    }
    if restart_at is not None:
        out["checks"]["200_within_10s_of_restart"] = out["first_200_after_restart_s"] is not None and out["first_200_after_restart_s"] <= 10.0
        b = out["first_200_after_back_s"]
        out["checks"]["200_within_10s_of_answering_again"] = b is not None and b <= 10.0
    out["health_events"] = [{"at": rel(e.at), "endpoint": e.endpoint, "event": e.event, "detail": e.detail} for e in events]
    out["error_samples"] = sorted({f"{r['outcome']} {r['status']} {r['error']}"[:160] for r in rows if r["outcome"] != ANSWERED})[:8]
    out["requests_detail"] = rows
    return out


def _s(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f} s"


def table(runs: list[dict]) -> str:
    head = ("| profile | answered | clear errors | hung | lost | failed beyond in-flight at kill | dead pair's picks during outage "
            "| last pick after kill | first failure after kill | first 200 after restart (after the process answered again) | tracebacks |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        a = r["analysis"]
        lines.append(f"| {r['profile']} | {a[ANSWERED]}/{a['requests']} | {a[CLEAR_ERROR]} | {a[HUNG]} | {a[LOST]} | "
                     f"{a['failed_beyond_in_flight']} ({a['failed_beyond_in_flight_pct']:.1f}%; {a['failed_in_flight_at_kill']} of "
                     f"{a['in_flight_on_dead_at_kill']} in flight excused) | {a['dead_picks_during_outage']} "
                     f"({100 * a['dead_share_during_outage']:.0f}%) | {_s(a['last_pick_after_kill_s'])} | {_s(a['first_failure_after_kill_s'])} | "
                     f"{_s(a.get('first_200_after_restart_s'))} ({_s(a.get('first_200_after_back_s'))}) | {r.get('tracebacks', 0)} |")
    return "\n".join(lines)


def timeline_plot(runs: list[dict], path: Path) -> None:
    """One panel per profile: every request as a dot on its endpoint's row at its routing time, coloured by how it ended."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(12, 1.0 + 1.6 * len(runs)), sharex=True, squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        a = run["analysis"]
        detail = a["requests_detail"]
        endpoints = sorted({r["endpoint"] or NOT_ROUTED for r in detail} | {a["dead_endpoint"]})
        row = {e: i for i, e in enumerate(endpoints)}
        for outcome, colour in COLOURS.items():
            pts = [(r["routed_at"] if r["routed_at"] is not None else r["sent"], row[r["endpoint"] or NOT_ROUTED])
                   for r in detail if r["outcome"] == outcome]
            if pts:
                ax.scatter([x for x, _ in pts], [y for _, y in pts], s=9, color=colour, label=outcome.replace("_", " "), alpha=0.8)
        marks = {"kill": ("black", "kill {process}"), "restart": ("tab:blue", "restart"), "answering": ("tab:gray", "answering again")}
        actions = run.get("actions") or [{"action": a, "process": f["process"], "at": f[k]} for f in run["faults"]
                                         for a, k in (("kill", "at"), ("restart", "restart_at")) if f[k] is not None]
        for x in actions:
            colour, label = marks[x["action"]]
            ax.axvline(x["at"], color=colour, linestyle="--" if x["action"] != "answering" else ":", linewidth=1)
            ax.text(x["at"], len(endpoints) - 0.45, " " + label.format(process=x["process"]), fontsize=7, va="top", color=colour)
        for e in a["health_events"]:
            if e["endpoint"] in row and e["event"] in ("Endpoint ejected", "Endpoint unready", "Endpoint re-admitted"):
                marker = "v" if e["event"] != "Endpoint re-admitted" else "^"
                ax.scatter([e["at"]], [row[e["endpoint"]] + 0.3], marker=marker, s=25, color="black")
        ax.set_yticks(range(len(endpoints)), endpoints, fontsize=8)
        ax.set_ylim(-0.6, len(endpoints) - 0.3)
        ax.set_title(f"{run['profile']}: {a[ANSWERED]}/{a['requests']} answered, {a[CLEAR_ERROR]} clear errors, {a[HUNG]} hung, "
                     f"{a[LOST]} lost (▼ ejected/unready, ▲ re-admitted)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0, 0].legend(loc="upper right", fontsize=7, ncol=5)
    axes[-1, 0].set_xlabel("seconds since the start of the load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
