"""Percentiles, the per-endpoint and per-backend split, JSON and PNG outputs, profile comparisons."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Callable, Sequence

from serving_benchmark.runner import Result


def _stats(values: Sequence[float]) -> dict[str, float]:
    v = sorted(values)
    if not v:
        return {}
    q = lambda p: v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]  # noqa: E731
    return {"mean": statistics.fmean(v), "p50": q(50), "p90": q(90), "p99": q(99), "max": v[-1]}


def summarize(results: list[Result], duration: float, backend_of: Callable[[str], str], name_of: Callable[[str], str]) -> dict:
    ok = [r for r in results if r.status == 200 and r.ttft is not None]
    out = {
        "requests": len(results),
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "error_samples": sorted({f"{r.status} {r.error}"[:160] for r in results if r.status != 200})[:5],
        "duration_s": duration,
        "throughput_rps": len(ok) / duration if duration > 0 else 0.0,
        "output_tokens_per_s": sum(r.output_tokens for r in ok) / duration if duration > 0 else 0.0,
        "ttft_s": _stats([r.ttft for r in ok]),
        "tpot_s": _stats([r.tpot for r in ok if r.tpot is not None]),
        "e2e_s": _stats([r.e2e for r in ok]),
        "by_endpoint": {},
        "by_backend": {},
    }
    for key, fn in (("by_endpoint", name_of), ("by_backend", backend_of)):
        groups: dict[str, list[Result]] = {}
        for r in ok:
            groups.setdefault(fn(r.endpoint), []).append(r)
        out[key] = {g: {"count": len(rs), "share": len(rs) / len(ok), "ttft_mean_s": statistics.fmean(r.ttft for r in rs),
                        "e2e_mean_s": statistics.fmean(r.e2e for r in rs)} for g, rs in sorted(groups.items())}
    return out


def write_run(out_dir: Path, name: str, summary: dict, results: list[Result], meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}_latency_info.json").write_text(json.dumps({**meta, **summary, "requests_detail": [r.as_dict() for r in results]}, indent=1))
    ok = [r for r in results if r.status == 200 and r.ttft is not None]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, attr, title in ((axes[0], "ttft", "time to first token"), (axes[1], "e2e", "end-to-end latency")):
        v = sorted(getattr(r, attr) for r in ok)
        if v:
            ax.plot(v, [(i + 1) / len(v) for i in range(len(v))])
        ax.set_xlabel("seconds")
        ax.set_ylabel("fraction of requests")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.suptitle(name)
    fig.tight_layout()
    fig.savefig(out_dir / f"{name}_latency.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].hist([r.prompt_tokens for r in results], bins=30)
    axes[0].set_title("prompt tokens")
    axes[1].hist([r.output_tokens for r in results], bins=30)
    axes[1].set_title("output tokens")
    fig.suptitle(name)
    fig.tight_layout()
    fig.savefig(out_dir / f"{name}_len.png", dpi=110)
    plt.close(fig)


def comparison_table(rows: list[dict]) -> str:
    hits = any("prefix_cache" in r["summary"] for r in rows)
    lines = ["| scenario | profile | ok/total | TTFT mean | TTFT p99 | E2E mean | E2E p99 | nvlink share |" + (" prefix-cache hits |" if hits else ""),
             "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if hits else "")]
    for r in rows:
        s = r["summary"]
        nv = s["by_backend"].get("nvlink", {}).get("share", 0.0)
        ms = lambda d, k: f"{d.get(k, float('nan')) * 1000:.0f} ms"  # noqa: E731
        hit = f" {s['prefix_cache']['hit_rate'] * 100:.1f}% |" if "prefix_cache" in s else (" – |" if hits else "")
        lines.append(f"| {r['scenario']} | {r['profile']} | {s['completed']}/{s['requests']} | {ms(s['ttft_s'], 'mean')} | {ms(s['ttft_s'], 'p99')} | "
                     f"{ms(s['e2e_s'], 'mean')} | {ms(s['e2e_s'], 'p99')} | {nv * 100:.0f}% |{hit}")
    return "\n".join(lines)


def comparison_plot(rows: list[dict], path: Path, baseline: str | None = None) -> None:
    """Bars of the four figures per scenario and profile; with `baseline`, as % of that profile's figure.

    A burst's seconds dwarf a light load's milliseconds on one axis; relative bars show every
    scenario's differences at the same scale, with 100% marking the baseline.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    every = list(dict.fromkeys(r["profile"] for r in rows))
    colour = {p: f"C{i}" for i, p in enumerate(every)}  # a profile keeps its colour in both kinds of plot
    profiles = [p for p in every if p != baseline]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7), sharex=True)
    width = 0.8 / max(1, len(profiles))

    def figure(prof: str, sc: str, metric: str, stat: str) -> float:
        match = [r for r in rows if r["scenario"] == sc and r["profile"] == prof]
        return match[0]["summary"][metric].get(stat, 0.0) * 1000 if match else 0.0

    for (ax, metric, stat) in ((axes[0][0], "ttft_s", "mean"), (axes[0][1], "ttft_s", "p99"), (axes[1][0], "e2e_s", "mean"), (axes[1][1], "e2e_s", "p99")):
        for i, prof in enumerate(profiles):
            vals = [figure(prof, sc, metric, stat) for sc in scenarios]
            if baseline is not None:
                base = [figure(baseline, sc, metric, stat) for sc in scenarios]
                vals = [100.0 * v / b if b > 0 else 0.0 for v, b in zip(vals, base)]
            ax.bar([x + i * width for x in range(len(scenarios))], vals, width, label=prof, color=colour[prof])
        name = f"{'TTFT' if metric == 'ttft_s' else 'end-to-end'} {stat}"
        if baseline is not None:
            ax.axhline(100.0, color="black", linewidth=1, linestyle="--")
            ax.set_title(f"{name} (% of {baseline}; lower is better)")
        else:
            ax.set_title(f"{name} (ms)")
        ax.set_xticks([x + width * (len(profiles) - 1) / 2 for x in range(len(scenarios))])
        ax.set_xticklabels(scenarios, rotation=20)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(profiles), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
