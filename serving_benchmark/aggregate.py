"""Medians over repeated comparisons: one noisy run on a shared machine proves little.

    python -m serving_benchmark.aggregate RUN_DIR [RUN_DIR …] --output-dir DIR [--name bench]

reads each run's `<name>_comparison.json` (written by `epp-bench --compare-profiles`) and writes
`<name>_median_comparison.{md,json,png}`: per profile and scenario, the median over runs of each
figure, and how many runs each profile beat the `--baseline` profile on every figure; and
`<name>_median_relative.png`, every figure as a percentage of the baseline's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from serving_benchmark.report import comparison_plot

FIGURES = (("ttft_s", "mean"), ("ttft_s", "p99"), ("e2e_s", "mean"), ("e2e_s", "p99"))


def load_runs(dirs: list[str], name: str) -> list[list[dict]]:
    runs = []
    for d in dirs:
        path = Path(d) / f"{name}_comparison.json"
        try:
            runs.append(json.loads(path.read_text())["rows"])
        except (OSError, KeyError, ValueError) as e:
            raise SystemExit(f"cannot read {path}: {e}") from None
    return runs


def median_rows(runs: list[list[dict]]) -> list[dict]:
    keys = list(dict.fromkeys((r["profile"], r["scenario"]) for run in runs for r in run))
    out = []
    for prof, scen in keys:
        matches = [r["summary"] for run in runs for r in run if r["profile"] == prof and r["scenario"] == scen]
        summary = {metric: {} for metric, _ in FIGURES}
        for metric, stat in FIGURES:
            summary[metric][stat] = statistics.median(m[metric][stat] for m in matches)
        share = statistics.median(m["by_backend"].get("nvlink", {}).get("share", 0.0) for m in matches)
        summary["by_backend"] = {"nvlink": {"share": share}}
        hits = [m["prefix_cache"]["hit_rate"] for m in matches if "prefix_cache" in m]
        if hits:
            summary["prefix_cache"] = {"hit_rate": statistics.median(hits)}
        summary["completed"] = sum(m["completed"] for m in matches)
        summary["requests"] = sum(m["requests"] for m in matches)
        out.append({"profile": prof, "scenario": scen, "runs": len(matches), "summary": summary})
    return out


def wins(runs: list[list[dict]], baseline: str) -> dict[str, dict[str, int]]:
    """profile -> scenario -> number of runs in which it beat `baseline` on all four figures."""
    out: dict[str, dict[str, int]] = {}
    for run in runs:
        base = {r["scenario"]: r["summary"] for r in run if r["profile"] == baseline}
        for r in run:
            if r["profile"] == baseline or r["scenario"] not in base:
                continue
            b = base[r["scenario"]]
            won = all(r["summary"][m][s] < b[m][s] for m, s in FIGURES)
            out.setdefault(r["profile"], {}).setdefault(r["scenario"], 0)
            out[r["profile"]][r["scenario"]] += int(won)
    return out


def table(rows: list[dict], win_counts: dict[str, dict[str, int]], nruns: int, baseline: str) -> str:
    hits = any("prefix_cache" in r["summary"] for r in rows)
    lines = [f"| scenario | profile | TTFT mean | TTFT p99 | E2E mean | E2E p99 | nvlink share |{' prefix-cache hits |' if hits else ''}"
             f" runs beating {baseline} on all four |",
             "|---|---|---:|---:|---:|---:|---:|" + ("---:|" if hits else "") + "---:|"]
    for r in rows:
        s = r["summary"]
        w = "–" if r["profile"] == baseline else f"{win_counts.get(r['profile'], {}).get(r['scenario'], 0)}/{nruns}"
        hit = (f" {s['prefix_cache']['hit_rate'] * 100:.1f}% |" if "prefix_cache" in s else " – |") if hits else ""
        lines.append(f"| {r['scenario']} | {r['profile']} | {s['ttft_s']['mean'] * 1000:.0f} ms | {s['ttft_s']['p99'] * 1000:.0f} ms | "
                     f"{s['e2e_s']['mean'] * 1000:.0f} ms | {s['e2e_s']['p99'] * 1000:.0f} ms | {s['by_backend']['nvlink']['share'] * 100:.0f}% |{hit} {w} |")
    return "\n".join(lines)


def aggregate(dirs: list[str], out_dir: str, name: str = "bench", baseline: str = "proxy-performance") -> str:
    runs = load_runs(dirs, name)
    rows = median_rows(runs)
    text = table(rows, wins(runs, baseline), len(runs), baseline)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}_median_comparison.md").write_text(text + "\n")
    (out / f"{name}_median_comparison.json").write_text(json.dumps({"runs": dirs, "rows": rows, "wins": wins(runs, baseline)}, indent=1))
    comparison_plot(rows, out / f"{name}_median_comparison.png")
    if any(r["profile"] == baseline for r in rows):
        comparison_plot(rows, out / f"{name}_median_relative.png", baseline)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving_benchmark.aggregate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="output directories of epp-bench --compare-profiles runs")
    p.add_argument("--output-dir", required=True, help="where the median comparison goes")
    p.add_argument("--name", default="bench", help="the runs' --log_filename (default: %(default)s)")
    p.add_argument("--baseline", default="proxy-performance", help="profile the others are compared with (default: %(default)s)")
    args = p.parse_args(argv)
    print(aggregate(args.runs, args.output_dir, args.name, args.baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
