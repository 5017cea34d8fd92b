"""Faults with real processes: the EPP routes around a backend that dies, hangs or fails, and takes it back.

One local stack (two P/D pairs behind the stack's gateway) for the module; each test starts a
fresh EPP, drives streaming completions through the gateway, breaks something and reads the
EPP's own decision log to see when it stopped and started picking the broken endpoint.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from pathlib import Path

import httpx
import pytest

from chaos_benchmark import faults as fx
from chaos_benchmark.client import ANSWERED, Sent, send_one
from chaos_benchmark.decisions import read_file
from local_stack.processes import ProcessGroup
from local_stack.stack import LocalStack, ProxyInfo, StackPorts
from local_stack.topology import Topology
from serving_benchmark.workload import Request
from tests.conftest import free_port, wait_until

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
READINESS_INTERVAL = 1.0  # the shipped profiles' readiness.interval: the "scrape interval" of the bounds below

FAST_HEALTH = """
- type: endpoint-health
  parameters:
    outlierDetection: {consecutive5xx: 3, consecutiveGatewayFailure: 2, baseEjectionTime: 3s, maxEjectionPercent: 50}
    readiness: {interval: 1s, timeout: 1s}
    firstByteTimeout: 1s
- type: round-robin-picker
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    ports = StackPorts(free_port(), free_port(), free_port(), free_port())
    s = LocalStack(Topology(profile_kv_transfer=False), "round-robin", root / "stack", ports)
    extra = ProcessGroup(root / "extra-logs")
    s.sick, s.sick_procs = {}, extra
    try:
        s.start(progress=lambda m: None)
        # two lone simulators as extra endpoints: one that never answers, one that answers 500 at once (their /health
        # says 200). Started once the stack listens, so that no free port is handed out twice; they come up while
        # the first tests run and are waited for where they are used.
        for name, fault in (("hanging-sim", "--hang-rate"), ("failing-sim", "--error-rate")):
            port = free_port()
            extra.start(name, ["vllm_sim.cli", "--role", "both", "--port", str(port), fault, "1.0", "--decode-ms-per-token", "2"])
            s.sick[name] = port
        yield s
    finally:
        s.stop()
        extra.stop()
    assert s.alive() == [] and extra.alive() == []


class Load:
    """Streaming completions through the gateway at a steady rate, in a thread, until stopped."""

    def __init__(self, url: str, rate: float = 8.0, timeout: float = 5.0) -> None:
        self.url, self.rate, self.timeout = url, rate, timeout
        self.sent: list[Sent] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=self.timeout + 10)
        assert not self._thread.is_alive()

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(self.timeout, connect=2.0)) as client:
            tasks, i = [], 0
            while not self._stop.is_set() and i < 2000:  # bounded: 2000 requests at most
                r = Request(i, "tell me about KV caches " * 20, 120, 8, 0.0)
                tasks.append(asyncio.create_task(self._one(client, r)))
                i += 1
                await asyncio.sleep(1.0 / self.rate)
            await asyncio.gather(*tasks)

    async def _one(self, client: httpx.AsyncClient, r: Request) -> None:
        self.sent.append(await send_one(client, self.url, MODEL, r, f"faults-{id(self)}-{r.index}", self.timeout))


def picks_of(stack: LocalStack, endpoint: str, since: float) -> list[float]:
    picks, _ = read_file(stack.epp_log, since)
    return [p.at for p in picks if p.endpoint == endpoint]


def served_ok(stack: LocalStack, load: Load, endpoint: str, since: float) -> list[float]:
    """End times of requests the endpoint answered, routed after `since`."""
    picks, _ = read_file(stack.epp_log, since)
    routed = {p.request_id for p in picks if p.endpoint == endpoint}
    return sorted(s.ended_at for s in list(load.sent) if s.request_id in routed and s.outcome == ANSWERED)


def failures_from(stack: LocalStack, load: Load, endpoint: str, since: float) -> list[float]:
    picks, _ = read_file(stack.epp_log, since)
    routed = {p.request_id for p in picks if p.endpoint == endpoint}
    return sorted(s.ended_at for s in list(load.sent) if s.request_id in routed and s.outcome != ANSWERED and s.ended_at >= since)


def kill_and_restart(stack: LocalStack, process: str, endpoint: str, health_url: str) -> None:
    with Load(stack.gateway_url) as load:
        assert wait_until(lambda: len(served_ok(stack, load, endpoint, 0)) >= 3, timeout=20), "the endpoint serves before the fault"
        fx.kill(stack, process)
        killed = time.time()
        time.sleep(3 * READINESS_INTERVAL)
        picks = picks_of(stack, endpoint, killed)
        fails = failures_from(stack, load, endpoint, killed)
        bound = killed + 2 * READINESS_INTERVAL
        if fails:
            bound = min(bound, fails[0] + 0.3)  # the first failure it returned (+ the time to log it)
        assert not [t for t in picks if t > bound], (
            f"{endpoint} picked {[round(t - killed, 2) for t in picks]} s after the kill; first failure "
            f"{round(fails[0] - killed, 2) if fails else None} s")
        others_ok = [s for s in load.sent if s.sent_at > killed + 1 and s.outcome == ANSWERED]
        assert len(others_ok) >= 5, "the other pair kept serving"
        fx.restart(stack, process)
        restarted = time.time()
        assert wait_until(lambda: fx.answers_200(health_url), timeout=60), f"{process} did not come back"
        back = time.time()
        assert wait_until(lambda: served_ok(stack, load, endpoint, restarted), timeout=10), (
            f"{endpoint} served no 200 within 10 s of {process} answering again ({back - restarted:.1f} s after its restart)")
        first_ok = served_ok(stack, load, endpoint, restarted)[0]
        assert first_ok - back < 10.0
    failed_after = [s for s in load.sent if s.sent_at > first_ok + 0.5 and s.outcome != ANSWERED]
    assert not failed_after, failed_after[:3]


def test_decode_sigkill_behind_a_proxy_then_restart(stack):
    stack.start_epp("round-robin")  # the picker that would keep alternating into a dead pair
    pair = next(p for p in stack.proxies if p.label == "fs")
    kill_and_restart(stack, f"{pair.name}-decode", pair.name, f"http://127.0.0.1:{pair.decode_port}/health")
    _, events = read_file(stack.epp_log)
    assert any(e.event == "Endpoint unready" and e.endpoint == pair.name and "decode 0/1 up" in e.detail for e in events), events


def test_proxy_sigkill_then_restart(stack):
    stack.start_epp("proxy-performance")
    pair = next(p for p in stack.proxies if p.label == "nvlink")
    kill_and_restart(stack, pair.name, pair.name, f"http://127.0.0.1:{pair.port}/health")
    _, events = read_file(stack.epp_log)
    # refused on a fresh connection, reset on a pooled keep-alive one
    assert any(e.event == "Endpoint unready" and e.endpoint == pair.name and re.search("cannot connect|connection reset", e.detail, re.I)
               for e in events), events


def with_sick_endpoint(stack: LocalStack, name: str, tmp_path: Path, monkeypatch) -> None:
    """A profile with quick deadlines, and the sick simulator added to the pool."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "fast-faults.yaml").write_text("plugins:" + FAST_HEALTH)
    monkeypatch.setenv("EPP_PROFILES_DIR", str(profiles))
    child = next(c for c in stack.sick_procs.children if c.name == name)
    stack.sick_procs.wait_http(child, f"http://127.0.0.1:{stack.sick[name]}/health", timeout=90)
    stack.proxies.append(ProxyInfo(name, "sick", stack.sick[name], 0, 0))
    stack.write_endpoints()
    stack.start_epp("fast-faults")


def drop_sick(stack: LocalStack) -> None:
    stack.proxies[:] = [p for p in stack.proxies if p.label != "sick"]
    stack.write_endpoints()


def test_an_endpoint_that_hangs_is_ejected_after_its_first_byte_deadline(stack, tmp_path, monkeypatch):
    with_sick_endpoint(stack, "hanging-sim", tmp_path, monkeypatch)
    try:
        start = time.time()
        with Load(stack.gateway_url, timeout=4.0) as load:
            assert wait_until(lambda: any(e.event == "Endpoint ejected" for e in read_file(stack.epp_log, start)[1]), timeout=15)
            ejected = next(e for e in read_file(stack.epp_log, start)[1] if e.event == "Endpoint ejected")
            time.sleep(1.5)
        assert ejected.endpoint == "hanging-sim" and "first_byte_timeout: no response after" in ejected.detail
        assert not [t for t in picks_of(stack, "hanging-sim", start) if t > ejected.at + 0.1], "picked after its ejection"
        hung = [s for s in load.sent if s.outcome != ANSWERED]
        assert 1 <= len(hung) <= 5, [(s.outcome, s.error) for s in hung]  # the ones sent before the deadline passed
        assert sum(s.outcome == ANSWERED for s in load.sent) >= 10
    finally:
        drop_sick(stack)


def test_an_endpoint_answering_instant_500s_is_ejected_then_tried_again_and_ejected_for_longer(stack, tmp_path, monkeypatch):
    with_sick_endpoint(stack, "failing-sim", tmp_path, monkeypatch)
    try:
        start = time.time()
        with Load(stack.gateway_url, rate=10) as load:
            def ejections():
                return [e for e in read_file(stack.epp_log, start)[1] if e.event == "Endpoint ejected"]
            assert wait_until(lambda: len(ejections()) >= 2, timeout=20)  # 3 s, a failed half-open trial, then 6 s
        first, second = ejections()[:2]
        assert first.endpoint == second.endpoint == "failing-sim"
        assert first.detail.startswith("3 5xx in a row (http_5xx: status 500)")
        assert second.detail == "half-open trial failed (http_5xx: status 500)"
        assert 2.9 < second.at - first.at < 6, "one trial request after the 3 s ejection"
        failed = [s for s in load.sent if s.outcome != ANSWERED]
        assert 4 <= len(failed) <= 5 and all(s.status == 500 and "injected failure" in s.error for s in failed)  # 3 + the trial
    finally:
        drop_sick(stack)
    log = (stack.logs / "epp.log").read_text()
    assert '"msg":"Endpoint ejected"' in log and '"ejection_seconds":6.0' in log

