"""The gateway when EPP replicas are missing or die: real Envoy, real `epp serve` processes, SIGKILL."""

import os
import signal
import subprocess
import sys
import threading
import time

import httpx

from gateway.envoy_config import EPP_UNAVAILABLE_BODY
from gateway.envoy_process import epp_hosts_healthy
from tests.conftest import free_port, wait_until

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_no_epp_gives_a_503_with_a_body_and_a_late_epp_is_found_within_seconds(rig):
    rig.upstream("a")
    grpc = free_port()
    envoy = rig.envoy("envoy-no-epp", [grpc], wait_for_epps=0)
    r = httpx.post(envoy.url + "/v1/chat/completions", json=CHAT, timeout=30)
    assert r.status_code == 503 and r.text == EPP_UNAVAILABLE_BODY
    assert r.headers["content-type"].startswith("text/plain")
    assert wait_until(lambda: any(e["details"].startswith("ext_proc_error") for e in envoy.access_log()), timeout=10)
    # The health check probes again within no_traffic_interval (1 s here), not Envoy's default 60 s.
    rig.epp("late-epp", grpc=grpc)
    t0 = time.monotonic()
    assert wait_until(lambda: epp_hosts_healthy(envoy.admin) == [f"127.0.0.1:{grpc}"], timeout=10, interval=0.1)
    assert time.monotonic() - t0 < 5
    assert httpx.post(envoy.url + "/v1/chat/completions", json=CHAT, timeout=30).status_code == 200


def _sse_load(url: str, seconds: float, workers: int, results: list) -> list[threading.Thread]:
    stop = time.monotonic() + seconds

    def worker() -> None:
        with httpx.Client(timeout=30) as c:
            while time.monotonic() < stop:
                t0 = time.monotonic()
                try:
                    r = c.post(url + "/v1/completions", json={"model": "m", "prompt": "p", "stream": True, "events": 3, "gap": 0.1})
                    outcome = "ok" if r.status_code == 200 and r.text.rstrip().endswith("[DONE]") else f"{r.status_code} {r.text[:60]!r}"
                except httpx.HTTPError as e:
                    outcome = f"cut: {type(e).__name__}"
                results.append((t0, time.monotonic(), outcome))

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    return threads


def test_two_epp_replicas_one_dies_and_traffic_continues_on_the_other(rig):
    rig.upstream("b")
    e1, e2 = rig.epp("epp-1"), rig.epp("epp-2")
    envoy = rig.envoy("envoy-two-epps", [e1.grpc, e2.grpc])
    with httpx.Client(timeout=30) as c:
        for _ in range(6):
            assert c.post(envoy.url + "/v1/chat/completions", json=CHAT).status_code == 200
        assert e1.decisions() and e2.decisions(), "round robin over both replicas"
        # Idle: nothing in flight on the replica that dies; the next requests must not notice.
        e1.kill()
        assert [c.post(envoy.url + "/v1/chat/completions", json=CHAT).status_code for _ in range(8)] == [200] * 8
    e1 = rig.epp("epp-1-again", grpc=e1.grpc)
    assert wait_until(lambda: len(epp_hosts_healthy(envoy.admin)) == 2, timeout=15, interval=0.1)

    # Busy: SSE streams in flight on both replicas when one dies.
    results: list = []
    threads = _sse_load(envoy.url, seconds=4.0, workers=4, results=results)
    time.sleep(1.5)
    killed_at = time.monotonic()
    e2.kill()
    for t in threads:
        t.join()
    after = [r for r in results if r[0] > killed_at]
    failed = [r for r in results if r[2] != "ok"]
    assert len(after) >= 8 and all(r[2] == "ok" for r in after), f"requests started after the kill failed: {[r for r in after if r[2] != 'ok']}"
    for start, end, outcome in failed:
        assert start <= killed_at <= end, f"only requests in flight on the dead replica may fail: {(start - killed_at, end - killed_at, outcome)}"
        # Visible either way: cut mid-response, or Envoy's 503 when the response had not started.
        assert outcome.startswith(("cut:", f"503 {EPP_UNAVAILABLE_BODY[:60]!r}")), f"a request on the dying EPP failed unclearly: {outcome}"
    assert len(failed) <= 4
    assert wait_until(lambda: epp_hosts_healthy(envoy.admin) == [f"127.0.0.1:{e1.grpc}"], timeout=10, interval=0.1)


def test_epp_gateway_up_runs_envoy_in_front_of_a_running_epp_and_stops_on_ctrl_c(rig, tmp_path):
    """`epp-gateway up`, the command for EPPs people run themselves: it becomes Envoy; Ctrl-C ends it."""
    rig.upstream("c")
    epp = rig.epp("epp-for-cli")
    port, admin = free_port(), free_port()
    cmd = [sys.executable, "-m", "gateway.cli", "up", "--epp", f"127.0.0.1:{epp.grpc}", "--port", str(port), "--admin-port", str(admin),
           "--config-out", str(tmp_path / "envoy.yaml")]
    out = open(tmp_path / "up.log", "w+")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_until(lambda: _ready(admin) and epp_hosts_healthy(admin), timeout=30, interval=0.1), (tmp_path / "up.log").read_text()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT, timeout=30)
        assert r.status_code == 200 and r.json()["from"] in rig.upstreams
        assert f"admin and stats http://127.0.0.1:{admin}/stats" in (tmp_path / "up.log").read_text()
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=30)
    assert code == 0, (tmp_path / "up.log").read_text()


def _ready(admin: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{admin}/ready", timeout=1).text.strip() == "LIVE"
    except httpx.HTTPError:
        return False
