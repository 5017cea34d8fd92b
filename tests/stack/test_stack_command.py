"""The README's main commands as a user runs them: `make run`, the README's curl through Envoy, Ctrl-C, nothing left behind."""

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]


def readme_curl(port: int) -> str:
    """The README's first curl command, pointed at this test's gateway port."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(curl -s http://127\.0\.0\.1:18080/v1/chat/completions.*?)\n(?:\S*epp decisions|```)", text, re.S)
    assert block, "the README shows a curl to the gateway on :18080"
    return block.group(1).replace("127.0.0.1:18080", f"127.0.0.1:{port}")


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_run_serves_the_readme_curl_through_envoy_and_stops_cleanly(tmp_path):
    gw, admin = free_port(), free_port()
    args = (f"--workdir {tmp_path / 'stack'} --gateway-port {gw} --envoy-admin-port {admin} --grpc-port {free_port()} "
            f"--grpc-health-port {free_port()} --metrics-port {free_port()}")
    out = open(tmp_path / "up.log", "w+")
    proc = subprocess.Popen(["make", "-s", "-C", str(ROOT), "run", f"ARGS={args}"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "ready: EPP" not in (tmp_path / "up.log").read_text():
            assert proc.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, "stack not ready in 120 s"
            time.sleep(0.5)
        log = (tmp_path / "up.log").read_text()
        assert f"Envoy gateway http://127.0.0.1:{gw}" in log and f"http://127.0.0.1:{admin}/stats" in log
        assert "LIVE" in httpx.get(f"http://127.0.0.1:{admin}/ready", timeout=5).text  # it is a real Envoy
        if shutil.which("curl"):
            answer = subprocess.run(["bash", "-c", readme_curl(gw)], capture_output=True, text=True, timeout=60, check=True).stdout
        else:
            answer = httpx.post(f"http://127.0.0.1:{gw}/v1/chat/completions", timeout=60, json={
                "model": "meta-llama/Llama-3.1-8B-Instruct", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}).text
        assert json.loads(answer)["usage"]["completion_tokens"] == 8
        envoy_log = tmp_path / "stack" / "logs" / "envoy.log"
        assert wait_until(lambda: '"details":"via_upstream"' in envoy_log.read_text(), timeout=10)
        (access,) = [json.loads(line) for line in envoy_log.read_text().splitlines() if line.startswith("{")]
        assert (access["path"], access["status"], access["method"]) == ("/v1/chat/completions", 200, "POST")
        time.sleep(1.5)  # a liveness check of the supervisor has run
        assert proc.poll() is None, (tmp_path / "up.log").read_text()
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
        code = proc.wait(timeout=60)
    log = (tmp_path / "up.log").read_text()
    # make re-raises the Ctrl-C it got once its child is done; epp-stack's own clean stop is in the log.
    assert code in (0, -signal.SIGINT), log
    assert "[epp-stack] stopped; no process left behind" in log and "failed" not in log
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path / "stack") not in ps, "a child of the stack is still running"
