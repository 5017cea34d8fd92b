"""`extproc-soak` end to end on a small scale: both scenarios against a real `epp serve` process."""

import json
import subprocess
import sys


def test_soak_command_reports_bounded_memory_and_refusals(tmp_path):
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, "-m", "extproc_loadgen.soak", "--requests", "300", "--concurrency", "4",
                        "--streams", "4", "--body-bytes", str(256 * 1024), "--extra", "2", "--warmup", "20",
                        "--workdir", str(tmp_path / "work"), "--output", str(out)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    for line in ("[ start]", "[middle]", "[   end]", "health on the health port", "control: the prober", "MiB held"):
        assert line in r.stdout
    data = json.loads(out.read_text())
    names, held = data["names"], data["held"]
    assert names["run"]["errors"] == 0 and names["run"]["requests"] == 300
    assert names["end"]["model_label_values"] <= 17  # 16 kept names + `other`, whatever the traffic
    assert names["end"]["in_flight"] == 0 and names["health"]["health_port"]["whole_run"]["checks"] > 0
    assert held["held"]["buffered_request_bytes"] == 4 * 256 * 1024
    assert held["extra_refused_429"] == 2 and held["extra_statuses"] == [429, 429]
    assert held["released"]["buffered_request_bytes"] == 0
