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


def test_shared_prefix_workload_is_multi_turn_behind_one_system_prompt():
    from serving_benchmark.workload import build_shared_prefix_workload

    w = build_shared_prefix_workload(12, 6, "poisson", 32, seed=1, system_tokens=200, turns=3, user_tokens=20, reply_tokens=10)
    assert w == build_shared_prefix_workload(12, 6, "poisson", 32, seed=1, system_tokens=200, turns=3, user_tokens=20, reply_tokens=10)
    system = w[0].messages[0]
    assert system["role"] == "system" and all(r.messages[0] == system for r in w), "one system prompt for every conversation"
    assert [len(r.messages) for r in w] == [2] * 4 + [4] * 4 + [6] * 4, "4 conversations, turn by turn"
    assert w[8].messages[:4] == w[4].messages[:4] and w[4].messages[:2] == w[0].messages[:2], "a turn extends its conversation"
    assert w[8].messages[3]["role"] == "user" and w[8].messages[2]["role"] == "assistant"
    assert all(abs(r.prompt_tokens - sum(len(m["content"]) for m in r.messages) // 4) <= 1 for r in w)
    assert [r.at for r in w] == sorted(r.at for r in w)
    with pytest.raises(ValueError):
        build_shared_prefix_workload(4, 1, "poisson", 8, 0, turns=0)


def test_hit_rates_reach_the_median_table(tmp_path):
    def with_hits(profile, ttft, hits):
        r = row(profile, ttft, 1.0)
        r["summary"]["prefix_cache"] = {"hit_rate": hits}
        return r

    runs = [run(tmp_path, f"r{i}", [with_hits("load-only", 0.2, 0.5), with_hits("prefix-cache", 0.1, h)]) for i, h in enumerate((0.7, 0.8, 0.9))]
    text = aggregate(runs, str(tmp_path / "out"), baseline="load-only")
    assert "| poisson@5 | prefix-cache | 100 ms | 200 ms | 1000 ms | 2000 ms | 50% | 80.0% | 0/3 |" in text
    assert "| poisson@5 | load-only | 200 ms | 400 ms | 1000 ms | 2000 ms | 50% | 50.0% | – |" in text
