"""The README's main command as a user runs it: `epp-stack up`, a request, Ctrl-C, nothing left behind."""

import os
import signal
import subprocess
import sys
import time

import httpx

from tests.conftest import free_port


def test_epp_stack_up_serves_and_stops_cleanly(tmp_path):
    gw = free_port()
    cmd = [sys.executable, "-m", "local_stack.cli", "up", "--workdir", str(tmp_path / "stack"), "--gateway-port", str(gw),
           "--grpc-port", str(free_port()), "--grpc-health-port", str(free_port()), "--metrics-port", str(free_port())]
    out = open(tmp_path / "up.log", "w+")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "ready: EPP" not in (tmp_path / "up.log").read_text():
            assert proc.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, "stack not ready in 120 s"
            time.sleep(0.5)
        r = httpx.post(f"http://127.0.0.1:{gw}/v1/chat/completions", timeout=60,
                       json={"model": "meta-llama/Llama-3.1-8B-Instruct", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        time.sleep(1.5)  # a liveness check of the supervisor has run
        assert proc.poll() is None, (tmp_path / "up.log").read_text()
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
        code = proc.wait(timeout=60)
    log = (tmp_path / "up.log").read_text()
    assert code == 0, log
    assert "no process left behind" in log
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path / "stack") not in ps, "a child of the stack is still running"
