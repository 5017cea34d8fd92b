"""`epp-chaos`: the fault schedule, the figures it derives, and one small run end to end."""

import json
import subprocess
import sys

import pytest

from chaos_benchmark.client import ANSWERED, CLEAR_ERROR, HUNG, LOST, Sent
from chaos_benchmark.decisions import HealthEvent, Pick, read_log
from chaos_benchmark.faults import Fault
from chaos_benchmark.report import analyse, table, timeline_plot


def test_fault_specs():
    assert Fault.parse("vllm-p2p-proxy-decode,12,26") == Fault("vllm-p2p-proxy-decode", 12.0, 26.0, "KILL")
    assert Fault.parse("vllm-fs-proxy, 3, -, stop") == Fault("vllm-fs-proxy", 3.0, None, "STOP")
    assert Fault.parse("vllm-fs-proxy-decode,3,9,USR1").signal == "USR1"
    for bad, message in (("x,1", "expected PROCESS,KILL_AT,RESTART_AT"), ("x,a,2", "seconds from the start"),
                         ("x,5,2", "restart must come after"), ("x,1,2,HUP", "signal must be one of")):
        with pytest.raises(ValueError, match=message):
            Fault.parse(bad)


def test_decision_log_timeline():
    lines = [
        json.dumps({"msg": "Scoring decision", "ts": "2026-01-01T00:00:01.500000Z", "request_id": "a", "selected_name": "p2p",
                    "excluded": {"fs": "unready: …"}}),
        json.dumps({"msg": "Endpoint ejected", "ts": "2026-01-01T00:00:02Z", "endpoint": "p2p", "detail": "2 gateway failures in a row"}),
        "not json", json.dumps({"msg": "Scoring decision", "request_id": "no-ts"}),
    ]
    picks, events = read_log(lines)
    assert len(picks) == 1 and picks[0].endpoint == "p2p" and picks[0].excluded == ("fs",)
    assert picks[0].at == pytest.approx(1767225601.5)
    assert events == [HealthEvent(1767225602.0, "p2p", "Endpoint ejected", "2 gateway failures in a row")]


def sent(i, start, end, outcome, status=200):
    return Sent(i, f"r{i}", 100 + start, 100 + end, outcome, status)


def test_figures_of_a_run(tmp_path):
    # kill at 10, restart at 20; dead = p2p. r0 ok before; r1 in flight at the kill (excused); r2 routed after the kill, failed;
    # r3 hung on fs (counts); r4..r6 on fs ok; r7 on p2p after the restart, ok at 23.5
    rows = [sent(0, 1, 2, ANSWERED), sent(1, 9.5, 10.2, LOST), sent(2, 10.3, 10.35, CLEAR_ERROR, 503), sent(3, 11, 41, HUNG, 0),
            sent(4, 12, 13, ANSWERED), sent(5, 13, 14, ANSWERED), sent(6, 15, 16, ANSWERED), sent(7, 22, 23.5, ANSWERED)]
    where = ["p2p", "p2p", "p2p", "fs", "fs", "fs", "fs", "p2p"]
    picks = [Pick(100 + s.sent_at - 100 + 0.01, s.request_id, e) for s, e in zip(rows, where)]
    a = analyse(rows, picks, [HealthEvent(110.4, "p2p", "Endpoint unready", "decode 0/1")], 100.0, "p2p", 10.0, 20.0, 1.0, back_at=21.0)
    assert (a["answered"], a["clear_error"], a["hung"], a["lost"], a["failed"]) == (5, 1, 1, 1, 3)
    assert a["in_flight_on_dead_at_kill"] == 1 and a["failed_in_flight_at_kill"] == 1 and a["failed_beyond_in_flight"] == 2
    assert a["dead_picks_during_outage"] == 1 and a["last_pick_after_kill_s"] == pytest.approx(0.31)
    assert a["first_failure_after_kill_s"] == pytest.approx(0.2)  # r1's end, in flight at the kill
    assert a["picks_after_bound"] == 1  # r2 was picked after the first failure came back
    assert a["first_pick_after_restart_s"] == pytest.approx(2.01) and a["first_200_after_restart_s"] == pytest.approx(3.5)
    assert a["first_200_after_back_s"] == pytest.approx(2.5) and a["process_answering_after_restart_s"] == 1.0
    assert a["checks"] == {"failed_beyond_in_flight_le_1pct": False, "no_hung": False, "no_lost": False, "no_pick_after_bound": False,
                           "200_within_10s_of_restart": True, "200_within_10s_of_answering_again": True}
    run = {"profile": "round-robin", "faults": [{"process": "vllm-p2p-proxy-decode", "at": 10.0, "restart_at": 20.0}], "tracebacks": 0,
           "analysis": a}
    md = table([run])
    assert "| round-robin | 5/8 | 1 | 1 | 1 | 2 (25.0%; 1 of 1 in flight excused) | 1 (20%) | 0.31 s | 0.20 s | 3.50 s (2.50 s) | 0 |" in md
    timeline_plot([run, {**run, "profile": "again"}], tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 10_000


def test_one_small_run_end_to_end(tmp_path):
    topo = tmp_path / "topology.yaml"
    topo.write_text("profile_kv_transfer: false\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "chaos_benchmark.cli", "--profiles", "round-robin", "--requests", "40", "--qps", "10",
           "--fault", "vllm-fs-proxy,1.5,2.5", "--warmup", "2", "--request-timeout", "10", "--topology", str(topo),
           "--workdir", str(tmp_path / "stack"), "--output-dir", str(out), "--name", "smoke"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "| round-robin | " in r.stdout and "wrote" in r.stdout
    data = json.loads((out / "smoke.json").read_text())
    a = data["runs"][0]["analysis"]
    assert a["requests"] == 40 and a["dead_endpoint"] == "vllm-fs-proxy" and len(a["requests_detail"]) == 40
    assert [x["action"] for x in data["runs"][0]["actions"]][:2] == ["kill", "restart"]
    assert a["first_200_after_restart_s"] is not None and a["process_answering_after_restart_s"] is not None
    assert a["hung"] == 0 and a["answered"] >= 30, a["error_samples"]
    assert any(e["event"] == "Endpoint unready" and e["endpoint"] == "vllm-fs-proxy" for e in a["health_events"])
    assert (out / "smoke_timeline.png").is_file() and (out / "smoke.md").read_text().startswith("`epp-chaos ")
