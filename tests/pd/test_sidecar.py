"""`pd-proxy --sidecar`: the decode pod's sidecar, driven by x-prefiller-host-port (real processes, NIXL over TCP).

One decode simulator and two sidecars in front of it (one failing on a dead prefill, one falling
back to a local prefill); prefill pods A (the endpoints file), B (--prefill-allow) and a flaky F.
"""

import socket
import threading

import httpx
import pytest
import yaml

from local_stack.processes import ProcessGroup
from tests.conftest import free_port, metric_total

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
PROMPT = "The quick brown fox " * 100  # 500 tokens: 32 KV blocks of 16 tokens, 1 MiB in the default shape
H = "x-prefiller-host-port"


@pytest.fixture(scope="module")
def pod(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sidecar")
    group = ProcessGroup(tmp / "logs")
    ports = {k: free_port() for k in ("a", "b", "f", "a_kv", "decode", "strict", "lenient", "dead")}
    eps = tmp / "endpoints.yaml"
    eps.write_text(yaml.safe_dump({"endpoints": [
        {"name": "prefill-a", "address": "127.0.0.1", "port": ports["a"], "labels": {"llm-d.ai/role": "prefill"}},
        {"name": "decode-0", "address": "127.0.0.1", "port": ports["strict"], "labels": {"llm-d.ai/role": "decode"}},
        {"name": "prefill-dead", "address": "127.0.0.1", "port": ports["dead"], "labels": {"llm-d.ai/role": "prefill"}},
    ]}))
    sim = ["vllm_sim.cli", "--kv-backend", "nixl", "--decode-ms-per-token", "2"]
    try:
        group.start("prefill-a", [*sim, "--role", "prefill", "--port", str(ports["a"]), "--kv-port", str(ports["a_kv"])])
        group.start("prefill-b", [*sim, "--role", "prefill", "--port", str(ports["b"])])
        group.start("prefill-f", [*sim, "--role", "prefill", "--port", str(ports["f"]), "--error-rate", "0.5", "--seed", "3"])
        # the link from A into this decode: 20 MB/s, so the pod's live profile has something to measure
        group.start("decode", [*sim, "--role", "decode", "--port", str(ports["decode"]), "--peer-link", f"127.0.0.1:{ports['a_kv']}=0.02,2"])
        side = ["pd_proxy.cli", "--host", "127.0.0.1", "--mode", "nixl", "--sidecar", "--kv-backend", "nvlink", "--scrape-interval", "0.2",
                "--decode", f"http://127.0.0.1:{ports['decode']}", "--endpoints-file", str(eps),
                "--prefill-allow", f"127.0.0.1:{ports['b']}", "--prefill-allow", f"127.0.0.1:{ports['f']}", "--retry-backoff", "0.01"]
        group.start("strict", [*side, "--port", str(ports["strict"]), "--prefill-retries", "3", "--consecutive-failures", "100"])
        group.start("lenient", [*side, "--port", str(ports["lenient"]), "--prefill-retries", "0", "--fallback-decode-only"])
        for c in group.children:
            port = ports[c.name.removeprefix("prefill-")] if c.name.startswith("prefill-") else ports[c.name]
            group.wait_http(c, f"http://127.0.0.1:{port}/health", timeout=90)
        yield {k: v for k, v in ports.items()} | {"logs": tmp / "logs"}
    finally:
        group.stop()


def url(pod, name):
    return f"http://127.0.0.1:{pod[name]}"


def post(pod, sidecar="strict", target=None, prompt=PROMPT):
    headers = {H: target} if target is not None else {}
    return httpx.post(f"{url(pod, sidecar)}/v1/completions", headers=headers, timeout=60,
                      json={"model": MODEL, "prompt": prompt, "max_tokens": 4})


def counter(base, name, **labels):
    return metric_total(f"{base}/metrics", name, **labels)


def test_the_named_prefill_runs_the_prefill_leg_and_the_decode_loads_its_kv(pod):
    a = f"127.0.0.1:{pod['a']}"
    before_a = counter(url(pod, "a"), "vllm:prompt_tokens_total")
    before_b = counter(url(pod, "b"), "vllm:prompt_tokens_total")
    r = post(pod, target=f"{a} , 10.0.0.9:1")  # first value, trimmed
    assert r.status_code == 200, r.text
    assert counter(url(pod, "a"), "vllm:prompt_tokens_total") == before_a + 500
    assert counter(url(pod, "b"), "vllm:prompt_tokens_total") == before_b
    assert counter(url(pod, "decode"), "vllm:prompt_tokens_by_source_total", source="external_kv_transfer") >= 500
    assert counter(url(pod, "strict"), "pdproxy_prefill_peer_requests_total", prefill=a, outcome="ok") >= 1
    # B is allowed by flag rather than by the endpoints file
    assert post(pod, target=f"127.0.0.1:{pod['b']}").status_code == 200
    assert counter(url(pod, "b"), "vllm:prompt_tokens_total") == before_b + 500


def test_no_header_or_an_empty_one_prefills_on_the_decode_itself(pod):
    before = counter(url(pod, "decode"), "vllm:prompt_tokens_by_source_total", source="local_compute")
    assert post(pod, prompt="local " * 100).status_code == 200
    assert post(pod, target="", prompt="local again " * 50).status_code == 200
    assert counter(url(pod, "decode"), "vllm:prompt_tokens_by_source_total", source="local_compute") > before
    assert counter(url(pod, "strict"), "pdproxy_prefill_peer_requests_total", outcome="local") >= 2
    assert counter(url(pod, "strict"), "pdproxy_prefill_fallbacks_total") == 0


def test_a_target_outside_the_pool_is_refused_without_a_connection(pod):
    # a listener on a port nobody allowed: it must never see a connection
    trap = socket.socket()
    trap.bind(("127.0.0.1", 0))
    trap.listen(8)
    trap.settimeout(0.2)
    accepted = []

    def watch():
        for _ in range(40):
            try:
                accepted.append(trap.accept())
            except OSError:
                pass

    t = threading.Thread(target=watch)
    t.start()
    try:
        trap_port = trap.getsockname()[1]
        cases = {
            f"127.0.0.1:{trap_port}": 403,  # same host, another port
            f"10.1.2.3:{pod['a']}": 403,  # another host, a prefill's port
            "169.254.169.254:80": 403,  # the cloud metadata address
            f"localhost:{pod['a']}": 403,  # a name for an allowed address is not the allowed entry
            f"127.0.0.1:{pod['strict']}": 403,  # a decode pod of the pool
            "http://127.0.0.1:80/": 400,
            "127.0.0.1": 400,
        }
        for target, status in cases.items():
            r = post(pod, target=target)
            assert r.status_code == status, (target, r.text)
            assert H in r.json()["error"]["message"] and r.json()["error"]["type"] == "PrefillTargetRefused"
    finally:
        t.join()
        trap.close()
    assert accepted == []
    assert counter(url(pod, "strict"), "pdproxy_prefill_target_refused_total", reason="outside_pool") >= 5
    assert counter(url(pod, "strict"), "pdproxy_prefill_target_refused_total", reason="malformed") >= 2


def test_a_failing_prefill_is_retried_by_the_policy(pod):
    f = f"127.0.0.1:{pod['f']}"
    results = [post(pod, target=f, prompt=f"retry {i} " * 60).status_code for i in range(6)]
    assert results == [200] * 6  # half its prefills fail; three retries each carry every request through (seeded)
    assert counter(url(pod, "strict"), "pdproxy_prefill_peer_requests_total", prefill=f, outcome="retried") >= 1
    assert "retry 1 of 3" in (pod["logs"] / "strict.log").read_text()


def test_a_dead_prefill_fails_with_a_clear_error_or_falls_back_to_a_local_prefill(pod):
    dead = f"127.0.0.1:{pod['dead']}"  # in the pool, not running
    r = post(pod, target=dead)
    assert r.status_code == 503, r.text
    msg = r.json()["error"]["message"]
    assert dead in msg and H in msg and "after 4 attempts" in msg
    r = post(pod, sidecar="lenient", target=dead)
    assert r.status_code == 200, r.text
    assert counter(url(pod, "lenient"), "pdproxy_prefill_fallbacks_total") >= 1
    # now known down: the next one fails at once rather than trying again
    r = post(pod, target=dead)
    assert r.status_code == 503 and "not usable" in r.json()["error"]["message"]


def test_the_live_link_profile_follows_a_link_degraded_at_run_time(pod):
    a = f"127.0.0.1:{pod['a']}"

    def at_64_blocks():
        return counter(url(pod, "strict"), "pdproxy_kv_transfer_profile_seconds", prefill=a, blocks="64")

    for i in range(3):
        assert post(pod, target=a, prompt=f"link {i} " * 120).status_code == 200
    healthy = at_64_blocks()
    assert 0.05 < healthy < 0.5  # 2 MiB at 20 MB/s + 2 ms ≈ 0.1 s
    r = httpx.post(f"{url(pod, 'decode')}/admin/link", json={"peer": f"127.0.0.1:{pod['a_kv']}", "bandwidth_factor": 0.2})
    assert r.status_code == 200, r.text
    for i in range(8):
        assert post(pod, target=a, prompt=f"slow {i} " * 120).status_code == 200
    assert at_64_blocks() > 3 * healthy
    assert counter(url(pod, "strict"), "pdproxy_kv_block_tokens") == 16
    httpx.post(f"{url(pod, 'decode')}/admin/link", json={"peer": f"127.0.0.1:{pod['a_kv']}", "bandwidth_factor": 1})


def test_sidecar_flags_are_checked(tmp_path):
    from pd_proxy.cli import main

    assert main(["--mode", "nixl", "--sidecar", "--decode", "http://127.0.0.1:1"]) == 2  # no allowlist
    assert main(["--mode", "p2p-nccl", "--sidecar", "--decode", "http://127.0.0.1:1=127.0.0.1:2", "--prefill-allow", "127.0.0.1:3"]) == 2
    assert main(["--mode", "nixl", "--sidecar", "--decode", "http://127.0.0.1:1", "--prefill", "http://127.0.0.1:2",
                 "--prefill-allow", "127.0.0.1:3"]) == 2
    assert main(["--mode", "nixl", "--sidecar", "--decode", "http://127.0.0.1:1", "--prefill-allow", "not a target"]) == 2
