"""vLLM's NIXL protocol end to end with simulators (real processes, the KV bytes really pulled over TCP)."""

import json
import re

import httpx
import pytest

from tests.conftest import free_port, wait_until

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
PROMPT = "The quick brown fox " * 60  # 300 tokens as the simulator counts


@pytest.fixture
def nixl_pair(procs, tmp_path):
    """A NIXL prefill + decode and a proxy; proxy mode and extra flags per test."""

    def start(*, mode="nixl", prefill_args=(), decode_args=(), proxy_args=()):
        http_p, http_d, proxy_port = free_port(), free_port(), free_port()
        d = procs.start("decode", ["vllm_sim.cli", "--role", "decode", "--port", str(http_d), "--kv-backend", "nixl",
                                   "--decode-ms-per-token", "2", *decode_args])
        p = procs.start("prefill", ["vllm_sim.cli", "--role", "prefill", "--port", str(http_p), "--kv-backend", "nixl", *prefill_args])
        x = procs.start("proxy", ["pd_proxy.cli", "--host", "127.0.0.1", "--port", str(proxy_port), "--mode", mode, "--kv-backend", "nvlink",
                                  "--prefill", f"http://127.0.0.1:{http_p}", "--decode", f"http://127.0.0.1:{http_d}",
                                  "--scrape-interval", "0.2", *proxy_args])
        for child, port in ((d, http_d), (p, http_p), (x, proxy_port)):
            procs.wait_http(child, f"http://127.0.0.1:{port}/health", timeout=60)
        return {"proxy": f"http://127.0.0.1:{proxy_port}", "prefill": f"http://127.0.0.1:{http_p}", "decode": f"http://127.0.0.1:{http_d}",
                "proxy_log": x.log_path}

    return start


def by_source(url):
    text = httpx.get(f"{url}/metrics").text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r'vllm:prompt_tokens_by_source_total\{[^}]*source="(\w+)"\} (\S+)', text)}


def metric(url, pattern):
    m = re.search(pattern + r" (\S+)$", httpx.get(f"{url}/metrics").text, re.M)
    return float(m.group(1)) if m else None


def test_nixl_flow_moves_the_kv_and_the_decode_loads_it(nixl_pair):
    pair = nixl_pair()
    # a client naming KV blocks itself is ignored: only the prefill's parameters reach the decode
    r = httpx.post(f"{pair['proxy']}/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": PROMPT, "max_tokens": 5,
        "kv_transfer_params": {"do_remote_prefill": True, "remote_host": "10.9.9.9", "remote_port": 1, "remote_request_id": "x"}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert re.fullmatch(r"cmpl-[0-9a-f]{32}", body["id"]), body["id"]  # one id for both legs, no "-0"
    assert body["usage"]["completion_tokens"] == 5
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi " * 100}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{pair['proxy']}/v1/chat/completions", json=chat, timeout=60) as s:
        events = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["usage"]["completion_tokens"] == 4
    assert by_source(pair["decode"]) == {"local_compute": 0.0, "local_cache_hit": 0.0, "external_kv_transfer": 300.0 + 76.0}  # the chat: "user" + 300 bytes, 4 bytes a token
    assert metric(pair["decode"], r'vllm:nixl_xfer_time_seconds_count\{[^}]*\}') == 2
    assert wait_until(lambda: metric(pair["prefill"], r'vllm:kv_cache_usage_perc\{[^}]*\}') == 0.0, 5), "blocks freed once read"
    proxy = pair["proxy"]
    assert wait_until(lambda: metric(proxy, r'pdproxy_decode_prompt_tokens_total\{kv_backend="nvlink",source="external_kv_transfer"\}') == 376, 5)
    assert metric(proxy, r'pdproxy_kv_recomputed_requests_total\{kv_backend="nvlink"\}') == 0
    assert metric(proxy, r'pdproxy_decode_first_token_seconds_count\{kv_backend="nvlink"\}') == 2
    assert metric(proxy, r'pdproxy_kv_transfer_seconds_count\{kv_backend="nvlink"\}') == 2  # reported once per request, not twice


def test_a_decode_that_recomputes_is_detected(nixl_pair):
    """The proxy speaking the wrong protocol: no kv_transfer_params, the decode computes every prompt — and it is reported."""
    pair = nixl_pair(mode="shared-storage")
    for i in range(3):
        r = httpx.post(f"{pair['proxy']}/v1/completions", json={"model": MODEL, "prompt": f"{i} " + PROMPT, "max_tokens": 3}, timeout=60)
        assert r.status_code == 200
    assert by_source(pair["decode"])["local_compute"] == 3 * 301  # each prompt 1,202 bytes: 301 tokens of 4 bytes
    proxy = pair["proxy"]
    assert wait_until(lambda: metric(proxy, r'pdproxy_kv_recomputed_requests_total\{kv_backend="nvlink"\}') == 3, 5)
    assert metric(proxy, r'pdproxy_kv_recompute_ratio\{kv_backend="nvlink"\}') > 0.5
    assert "computed" in pair["proxy_log"].read_text() and "instead of loading their KV" in pair["proxy_log"].read_text()


@pytest.mark.parametrize("stream", [False, True])
def test_kv_load_failure_is_retried_recomputing(nixl_pair, stream):
    """The prefill keeps nothing, so every KV load fails; the decode fails the request (policy fail), the proxy retries it recomputing."""
    pair = nixl_pair(prefill_args=["--kv-hold-timeout", "0"])
    r = httpx.post(f"{pair['proxy']}/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "stream": stream}, timeout=60)
    assert r.status_code == 200, r.text
    assert "error" not in r.text and ("[DONE]" in r.text if stream else r.json()["usage"]["completion_tokens"] == 3)
    assert metric(pair["proxy"], r'pdproxy_kv_load_failures_total\{kv_backend="nvlink"\}') == 1
    assert by_source(pair["decode"])["local_compute"] == 300
    assert "could not load the KV" in pair["proxy_log"].read_text()


def test_kv_load_failure_reported_with_policy_fail(nixl_pair):
    pair = nixl_pair(prefill_args=["--kv-hold-timeout", "0"], proxy_args=["--kv-load-failure-policy", "fail"])
    r = httpx.post(f"{pair['proxy']}/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3}, timeout=60)
    assert r.status_code == 502 and r.json()["error"]["type"] == "KVLoadError", r.text
    assert "could not load the KV cache" in r.json()["error"]["message"]


def test_decode_policy_recompute_is_silent_but_counted(nixl_pair):
    """vLLM's kv_load_failure_policy=recompute: the decode answers 200 — only the token-source counters show it."""
    pair = nixl_pair(prefill_args=["--kv-hold-timeout", "0"], decode_args=["--kv-load-failure-policy", "recompute"])
    r = httpx.post(f"{pair['proxy']}/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3}, timeout=60)
    assert r.status_code == 200
    assert metric(pair["proxy"], r'pdproxy_kv_load_failures_total\{kv_backend="nvlink"\}') == 0
    assert wait_until(lambda: metric(pair["proxy"], r'pdproxy_kv_recomputed_requests_total\{kv_backend="nvlink"\}') == 1, 5)


def test_shared_storage_keyed_by_the_prompt_whole_blocks_only(pd_pair, tmp_path):
    """As vLLM's ExampleConnector: whole blocks before the last token, in a folder named by the prompt's hash, kept for the prompt's return."""
    from kv_transfer import KVShape
    from kv_transfer.shared_fs import request_dir
    from vllm_sim.kv_io import prompt_key, stored_tokens
    from vllm_sim.prefix_cache import prompt_token_ids

    pair = pd_pair("fs")
    for prompt in (PROMPT, "short prompt"):  # 300 tokens: 288 stored; 3 tokens: nothing
        r = httpx.post(f"{pair['proxy']}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
    assert stored_tokens(300, 16) == 288
    assert by_source(pair["decode"]) == {"local_compute": 12.0 + 3.0, "local_cache_hit": 0.0, "external_kv_transfer": 288.0}
    stored = request_dir(tmp_path / "kv", prompt_key(prompt_token_ids({"prompt": PROMPT}), 288, MODEL))
    assert [p.name for p in (tmp_path / "kv").iterdir()] == [stored.name], "one folder, the long prompt's; none for the short one"
    assert json.loads((stored / "meta.json").read_text())["bytes"] == 18 * KVShape(4, 2, 64, 16, "float16").block_bytes
    # the prompt again: loaded from the same folder, stored once (vLLM's store keeps it; a sweep removes it later)
    r = httpx.post(f"{pair['proxy']}/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200
    assert by_source(pair["decode"])["external_kv_transfer"] == 2 * 288.0
    assert [p.name for p in (tmp_path / "kv").iterdir()] == [stored.name]
