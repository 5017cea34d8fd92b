"""`envoy-loadgen` as a user runs it (tiny durations: it must work, the figures come from real runs)."""

import json
import subprocess
import sys

from extproc_loadgen.through_envoy import summarize


def test_envoy_loadgen_measures_both_paths_and_writes_json_and_png(tmp_path):
    cmd = [sys.executable, "-m", "extproc_loadgen.through_envoy", "--concurrency", "1,4", "--repeat", "1", "--duration", "0.6",
           "--warmup", "0.2", "--endpoints", "2", "--workdir", str(tmp_path / "work"), "--output-dir", str(tmp_path / "out")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "EPP   adds" in r.stdout and "FLOOR adds" in r.stdout and "throughput ratio" in r.stdout
    result = json.loads((tmp_path / "out" / "envoy-loadgen.json").read_text())
    assert (tmp_path / "out" / "envoy-loadgen.png").stat().st_size > 10_000
    assert [s["concurrency"] for s in result["summary"]] == [1, 4]
    for row in result["rounds"]:
        assert row["requests"] > 0 and row["errors"] == 0, row
    assert {row["path"] for row in result["rounds"]} == {"direct", "envoy+epp", "envoy+floor"}
    through_epp = sum(row["requests"] for row in result["rounds"] if row["path"] == "envoy+epp")
    assert result["epp_scheduled_requests"] >= through_epp, "every request on the EPP path was scheduled by the EPP"
    # Both paths answered from the same upstream listeners; the direct path never reached the EPP.
    access = [json.loads(line) for line in (tmp_path / "work" / "logs" / "envoy.log").read_text().splitlines() if line.startswith("{")]
    assert {a["status"] for a in access} == {200}


def test_summary_pairs_rounds_and_takes_medians():
    def row(path, c, rnd, rps, p50):
        return {"path": path, "concurrency": c, "round": rnd, "req_per_s": rps, "errors": 0, "latency_ms": {"p50": p50, "p99": p50 * 2}}

    rounds = [row("direct", 1, 0, 1000, 1.0), row("envoy+epp", 1, 0, 300, 3.0),
              row("direct", 1, 1, 900, 1.2), row("envoy+epp", 1, 1, 450, 2.0),
              row("direct", 1, 2, 1100, 0.9), row("envoy+epp", 1, 2, 220, 4.9)]
    (s,) = summarize(rounds)
    assert s["rounds"] == 3
    assert s["epp_added_p50_ms_per_round"] == [2.0, 0.8, 4.0] and s["epp_added_p50_ms"] == 2.0
    assert s["epp_throughput_ratio_per_round"] == [0.3, 0.5, 0.2] and s["epp_throughput_ratio"] == 0.3
    assert s["direct"]["req_per_s"] == 1000 and s["envoy+epp"]["p50_ms"] == 3.0


def test_interleaved_rounds_use_the_paired_difference():
    def row(path, rnd, p50, paired=None):
        r = {"path": path, "concurrency": 1, "round": rnd, "req_per_s": 1000 / p50, "errors": 0, "latency_ms": {"p50": p50, "p99": p50 * 3}}
        if paired is not None:
            r["paired_added_ms"] = {"p50": paired, "p90": paired * 2, "pairs": 100}
        return r

    (s,) = summarize([row("direct", 0, 1.0), row("envoy+epp", 0, 2.5, paired=1.4), row("direct", 1, 1.1), row("envoy+epp", 1, 2.0, paired=0.8)])
    assert s["epp_added_p50_ms_per_round"] == [1.4, 0.8]  # not 1.5 and 0.9: the p50 of differences, cycle by cycle
    assert s["epp_added_p50_ms"] == 1.1
