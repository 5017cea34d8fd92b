"""`epp decisions [FILE|-]`: the seed's `rg 'Scoring decision' | sort | uniq -c`, done properly.

Reads JSON log lines (other lines are skipped), and prints the selection split per endpoint and
per kv-backend label, the prompt sizes each kv-backend was given (fabric-aware profiles send
long prompts to the fast fabric: this is where that shows), the P/D split (decode-only vs
prefill-decode, which prefill pods, which prompt sizes), failures by code, the distribution of
each scorer's raw score and of the winning totals, and endpoint health per endpoint: picks, failed
requests by outcome, how often it was left out, ejections by reason and readiness losses. `--json`
prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter, defaultdict
from typing import IO, Any, Iterable, Sequence

from epp.observability.decision_log import DECISION_MSG, FAILURE_MSG


def summarize(lines: Iterable[str]) -> dict[str, Any]:
    by_endpoint: Counter[str] = Counter()
    by_backend: Counter[str] = Counter()
    by_profile: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    scorer_values: dict[str, list[float]] = defaultdict(list)
    winning: list[float] = []
    filtered: Counter[str] = Counter()
    prompts: dict[str, list[float]] = defaultdict(list)
    disagg: Counter[str] = Counter()  # P/D: decode-only / prefill-decode / …, and where the prefills went
    prefill_picks: Counter[str] = Counter()
    disagg_prompts: dict[str, list[float]] = defaultdict(list)
    health: dict[str, dict[str, Any]] = defaultdict(_endpoint_health)
    panics = 0
    decisions = 0
    for line in lines:
        line = line.strip()
        if not line.startswith("{") or not any(k in line for k in ("Scor", "Scheduling failed", "Request ended", "Endpoint ")):
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        m = ev.get("msg") or ev.get("event")
        if m == DECISION_MSG:
            decisions += 1
            sel_field = ev.get("selected")
            by_endpoint[ev.get("selected_name") or (sel_field[0] if isinstance(sel_field, list) and sel_field else str(sel_field))] += 1
            backend = ev.get("kv_backend", "none")
            by_backend[backend] += 1
            if isinstance(ev.get("prompt_tokens"), (int, float)):
                prompts[backend].append(float(ev["prompt_tokens"]))
            by_profile[ev.get("profile", "?")] += 1
            sel = ev.get("selected_name")
            for key, per in (ev.get("scores") or {}).items():
                for scorer, value in per.items():
                    scorer_values[scorer].append(float(value))
            totals = ev.get("totals") or {}
            if sel in totals:
                winning.append(float(totals[sel]))
            for flt in ev.get("filtered_out") or {}:
                filtered[flt] += 1
            pd = (ev.get("notes") or {}).get("disaggregation")
            if isinstance(pd, dict) and pd.get("decision"):
                disagg[pd["decision"]] += 1
                if pd.get("prefill"):
                    prefill_picks[pd["prefill"]] += 1
                if isinstance(ev.get("prompt_tokens"), (int, float)):
                    disagg_prompts[pd["decision"]].append(float(ev["prompt_tokens"]))
            if sel:
                health[sel]["picks"] += 1
            for key in ev.get("excluded") or {}:
                health[key]["excluded_from"] += 1
            panics += bool(ev.get("health_panic"))
        elif m == FAILURE_MSG:
            failures[ev.get("error_code", "?")] += 1
            for key in ev.get("excluded") or {}:
                health[key]["excluded_from"] += 1
        elif m == "Request ended" and ev.get("endpoint"):
            health[ev["endpoint"]]["ended_badly"][str(ev.get("outcome", "?"))] += 1
        elif m == "Endpoint ejected" and ev.get("endpoint"):
            health[ev["endpoint"]]["ejections"][str(ev.get("reason", "?"))] += 1
        elif m in ("Endpoint unready", "Endpoint ready", "Endpoint re-admitted") and ev.get("endpoint"):
            health[ev["endpoint"]][m.split()[1].replace("-", "_")] += 1
    return {
        "decisions": decisions,
        "failures": dict(failures),
        "by_endpoint": dict(by_endpoint.most_common()),
        "by_kv_backend": dict(by_backend.most_common()),
        "by_profile": dict(by_profile.most_common()),
        "prompt_tokens_by_kv_backend": {b: _stats(prompts[b]) for b in by_backend if prompts.get(b)},
        "filters_removing": dict(filtered),
        "disaggregation": dict(disagg.most_common()),
        "prefill_endpoint": dict(prefill_picks.most_common()),
        "prompt_tokens_by_disaggregation": {k: _stats(v) for k, v in disagg_prompts.items()},
        "scores": {name: _stats(v) for name, v in sorted(scorer_values.items())},
        "winning_total": _stats(winning),
        "endpoint_health": {k: {f: dict(v) if isinstance(v, Counter) else v for f, v in h.items()} for k, h in sorted(health.items())},
        "health_panics": panics,
    }


def _endpoint_health() -> dict[str, Any]:
    return {"picks": 0, "ended_badly": Counter(), "excluded_from": 0, "ejections": Counter(), "unready": 0, "ready": 0, "re_admitted": 0}


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)
    q = lambda p: v[min(len(v) - 1, int(p * (len(v) - 1) + 0.5))]  # noqa: E731
    return {"n": len(v), "min": v[0], "p50": q(0.5), "p90": q(0.9), "max": v[-1], "mean": round(statistics.fmean(v), 4)}


def _split(title: str, counts: dict[str, int], total: int, out: IO[str]) -> None:
    print(title, file=out)
    for k, n in counts.items():
        pct = 100.0 * n / total if total else 0.0
        print(f"  {n:7d}  {pct:5.1f}%  {k}", file=out)


def render(s: dict[str, Any], out: IO[str]) -> None:
    n = s["decisions"]
    nf = sum(s["failures"].values())
    print(f"{n} scoring decisions, {nf} scheduling failures", file=out)
    if n:
        _split("selected endpoint:", s["by_endpoint"], n, out)
        _split("selected kv-backend:", s["by_kv_backend"], n, out)
        if s["prompt_tokens_by_kv_backend"]:
            print("prompt tokens by selected kv-backend:", file=out)
            for b, st in s["prompt_tokens_by_kv_backend"].items():
                print(f"  {b:12} n={st['n']} p50={st['p50']:.0f} p90={st['p90']:.0f} max={st['max']:.0f} mean={st['mean']:.0f}", file=out)
        if len(s["by_profile"]) > 1:
            _split("profile:", s["by_profile"], n, out)
        if s["disaggregation"]:
            _split("P/D decision:", s["disaggregation"], n, out)
            _split("prefill endpoint (disaggregated requests):", s["prefill_endpoint"], sum(s["prefill_endpoint"].values()), out)
            for k, st in s["prompt_tokens_by_disaggregation"].items():
                print(f"  {k:15} prompt tokens p50={st['p50']:.0f} p90={st['p90']:.0f} max={st['max']:.0f}", file=out)
    if nf:
        _split("failures by code:", s["failures"], nf, out)
    if s["filters_removing"]:
        _split("filters that removed endpoints (decisions):", s["filters_removing"], n, out)
    if s["scores"]:
        print("raw scores (all candidates):", file=out)
        for name, st in s["scores"].items():
            print(f"  {name:32} n={st['n']} min={st['min']:.3f} p50={st['p50']:.3f} p90={st['p90']:.3f} max={st['max']:.3f} mean={st['mean']:.3f}", file=out)
    if s["winning_total"]:
        st = s["winning_total"]
        print(f"winning weighted total: min={st['min']:.3f} p50={st['p50']:.3f} max={st['max']:.3f}", file=out)
    eh = s.get("endpoint_health") or {}
    if any(h["ended_badly"] or h["excluded_from"] or h["ejections"] or h["unready"] for h in eh.values()):
        print("endpoint health (picks; requests that ended badly; decisions it was left out of; ejections; readiness):", file=out)
        for key, h in eh.items():
            bad = " ".join(f"{k}={n}" for k, n in sorted(h["ended_badly"].items(), key=lambda kv: -kv[1])) or "none"
            ej = " ".join(f"{k}={n}" for k, n in sorted(h["ejections"].items())) or "none"
            print(f"  {key:28} picks={h['picks']}  ended badly: {bad}  left out of {h['excluded_from']}  ejections: {ej}  "
                  f"unready {h['unready']}× ready again {h['ready']}× re-admitted {h['re_admitted']}×", file=out)
        if s.get("health_panics"):
            print(f"  panic (too few healthy: every endpoint used) in {s['health_panics']} decisions", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="epp decisions", description="Summarise `Scoring decision` log lines.")
    p.add_argument("file", nargs="?", default="-", help="log file, or - for stdin (default)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.file == "-":
        summary = summarize(sys.stdin)
    else:
        try:
            with open(args.file, encoding="utf-8", errors="replace") as f:
                summary = summarize(f)
        except OSError as e:
            print(f"epp decisions: cannot read {args.file}: {e.strerror}", file=sys.stderr)
            return 2
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        print()
    else:
        render(summary, sys.stdout)
    return 0
