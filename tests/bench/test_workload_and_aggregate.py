"""The benchmark's workloads are reproducible, and repeated comparisons reduce to medians and win counts."""

import json

import pytest

from serving_benchmark.aggregate import aggregate
from serving_benchmark.cli import _without, scenarios
from serving_benchmark.workload import arrivals, build_workload


def test_workload_is_deterministic_and_shaped():
    a = build_workload(50, 10, "poisson", 2048, 64, seed=3)
    b = build_workload(50, 10, "poisson", 2048, 64, seed=3)
    assert a == b and a != build_workload(50, 10, "poisson", 2048, 64, seed=4)
    assert all(r.prompt_tokens + r.output_tokens <= 2048 and 4 <= r.output_tokens <= 64 for r in a)
    assert all(abs(len(r.prompt) / 4 - r.prompt_tokens) <= 1 for r in a)  # ~4 characters per token
    times = [r.at for r in a]
    assert times == sorted(times) and 2 < times[-1] < 10  # ~50 arrivals at 10/s
    import random

    assert arrivals(random.Random(0), 5, 10, "burst") == [0.0] * 5
    assert arrivals(random.Random(0), 3, 2, "uniform") == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError):
        arrivals(random.Random(0), 3, 2, "gamma")


def test_scenarios_and_argv_filtering():
    assert scenarios("burst,poisson", "5,10") == [("burst", 0.0), ("poisson", 5.0), ("poisson", 10.0)]
    assert _without(["--repeat", "3", "--qps=5", "--output-dir=x", "--seed", "1"], "--repeat", "--output-dir") == ["--qps=5", "--seed", "1"]


def run(tmp_path, name, rows):
    d = tmp_path / name
    d.mkdir()
    (d / "bench_comparison.json").write_text(json.dumps({"rows": rows}))
    return str(d)


def row(profile, ttft, e2e):
    stat = lambda v: {"mean": v, "p99": v * 2}  # noqa: E731
    return {"profile": profile, "scenario": "poisson@5", "summary": {
        "ttft_s": stat(ttft), "e2e_s": stat(e2e), "by_backend": {"nvlink": {"share": 0.5}}, "completed": 10, "requests": 10}}


def test_medians_and_win_counts(tmp_path):
    runs = [run(tmp_path, "r1", [row("proxy-performance", 0.2, 1.0), row("fast", 0.1, 0.9)]),
            run(tmp_path, "r2", [row("proxy-performance", 0.2, 1.0), row("fast", 0.3, 0.8)]),
            run(tmp_path, "r3", [row("proxy-performance", 0.4, 1.2), row("fast", 0.1, 1.1)])]
    text = aggregate(runs, str(tmp_path / "out"))
    assert "| poisson@5 | fast | 100 ms | 200 ms | 900 ms | 1800 ms | 50% | 2/3 |" in text
    assert "| poisson@5 | proxy-performance | 200 ms | 400 ms | 1000 ms | 2000 ms | 50% | – |" in text
    assert (tmp_path / "out" / "bench_median_comparison.png").exists()
    assert (tmp_path / "out" / "bench_median_relative.png").exists()  # figures as % of the baseline's
