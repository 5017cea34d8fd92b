"""Backend faults with real processes: kills, restarts, engine death, a hung engine, a long idle.

Every test ends by reading every process's log: no tracebacks, no unretrieved task errors.
Link and stall timeouts are set short so each test runs in seconds.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time

import httpx

from tests.conftest import free_port, wait_until

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
FAST_LINK = ["--kv-link-timeout", "1"]  # gloo's op timeout: an idle link once died of it
NOT_IN_LOGS = ("Traceback", "Error handling request", "Unhandled exception", "was never retrieved", "Exception raised from")


def request_body(stream: bool = False, max_tokens: int = 5) -> dict:
    return {"model": MODEL, "prompt": "The quick brown fox " * 40, "max_tokens": max_tokens, "stream": stream}


def post(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=request_body(**body), timeout=30)


class Stream(threading.Thread):
    """A streaming request read line by line in the background; `started` once its first event came."""

    def __init__(self, url: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.started, self.lines, self.status, self.error = threading.Event(), [], None, None

    def run(self) -> None:
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=request_body(True, self.max_tokens), timeout=30) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.lines.append(line)
                        self.started.set()
        except httpx.HTTPError as e:
            self.error = e
        finally:
            self.started.set()

    def error_event(self) -> dict | None:
        for line in self.lines:
            if line.startswith('data: {"error"'):
                return json.loads(line[6:])["error"]
        return None


class Whole(threading.Thread):
    """A non-streamed request in the background."""

    def __init__(self, url: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.max_tokens, self.response, self.error = url, max_tokens, None, None

    def run(self) -> None:
        try:
            self.response = post(self.url, max_tokens=self.max_tokens)
        except httpx.HTTPError as e:
            self.error = e


def both_running(pair, max_tokens: int) -> tuple[Stream, Whole]:
    """A streamed and a whole request, both generating on the decode when this returns."""
    stream, whole = Stream(pair["proxy"], max_tokens), Whole(pair["proxy"], max_tokens)
    stream.start()
    whole.start()
    assert stream.started.wait(15) and wait_until(lambda: running(pair["decode"]) >= 2, timeout=10)
    return stream, whole


def assert_clean_logs(procs) -> None:
    for path in sorted(procs.log_dir.glob("*.log")):
        text = path.read_text(errors="replace")
        for bad in NOT_IN_LOGS:
            assert bad not in text, f"{path.name} has {bad!r}:\n{text[-3000:]}"


def running(url: str) -> float:
    m = re.search(r'vllm:num_requests_running\{[^}]*\} ([0-9.]+)', httpx.get(f"{url}/metrics").text)
    return float(m.group(1)) if m else -1.0


def instance_up(proxy: str, role: str) -> list[float]:
    text = httpx.get(f"{proxy}/metrics").text
    return [float(v) for v in re.findall(rf'pdproxy_instance_up\{{[^}}]*role="{role}"[^}}]*\}} ([0-9.]+)', text)]


def fails_fast(proxy: str, *statuses: int) -> httpx.Response:
    t0 = time.monotonic()
    r = post(proxy)
    elapsed = time.monotonic() - t0
    assert r.status_code in statuses, r.text
    assert elapsed < 1.0, f"a request to a dead instance took {elapsed:.2f}s"
    assert r.headers["content-type"].startswith("application/json") and r.json()["error"]["message"], r.text
    return r


def serves_again(proxy: str, within: float) -> float:
    """Seconds until the proxy answers 200 again (polled); fails after `within`."""
    t0 = time.monotonic()
    assert wait_until(lambda: post(proxy).status_code == 200, timeout=within, interval=0.2), f"no 200 within {within}s"
    return time.monotonic() - t0


def test_idle_link_then_decode_killed_mid_stream_and_restarted(pd_pair, procs):
    pair = pd_pair("nccl", prefill_args=FAST_LINK, decode_args=[*FAST_LINK, "--decode-ms-per-token", "10"])
    proxy = pair["proxy"]
    assert post(proxy).status_code == 200
    time.sleep(3)  # idle three link timeouts: the KV link must still carry the next transfers
    results = []
    threads = [threading.Thread(target=lambda: results.append(post(proxy).status_code)) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert results == [200] * 4, results

    streams = [Stream(proxy, 300) for _ in range(2)]  # ~3 s each at 10 ms per token
    for s in streams:
        s.start()
    assert all(s.started.wait(15) for s in streams) and all(s.lines for s in streams)
    pair.signal("decode", signal.SIGKILL)
    for s in streams:
        s.join(10)
        assert not s.is_alive() and s.error is None, s.error  # a well-formed end, not a cut connection
        assert s.status == 200 and s.lines[-1] == "data: [DONE]", s.lines[-3:]
        err = s.error_event()
        assert err and err["code"] == 502 and "closed the connection mid-stream" in err["message"], err
    r = fails_fast(proxy, 500, 502, 503)  # the first may find out through the prefill's failed KV send
    assert wait_until(lambda: httpx.get(f"{proxy}/health").status_code == 503, timeout=2)
    health = httpx.get(f"{proxy}/health").json()
    decode = next(i for i in health["instances"] if i["role"] == "decode")
    # a fresh connection is refused; a probe on a pooled keep-alive connection is reset instead
    assert decode["state"] == "down" and not decode["up"] and re.search("cannot connect|connection reset", decode["reason"], re.I), decode
    assert instance_up(proxy, "decode") == [0.0] and instance_up(proxy, "prefill") == [1.0]
    r = fails_fast(proxy, 503)
    assert "no healthy decode instance" in r.json()["error"]["message"]

    pair.restart("decode")  # same ports: the prefill's cached KV link is to the dead process
    assert serves_again(proxy, within=10) < 10
    assert [post(proxy).status_code for _ in range(3)] == [200] * 3
    assert instance_up(proxy, "decode") == [1.0]
    assert_clean_logs(procs)


def test_prefill_and_proxy_killed_and_restarted(pd_pair, procs):
    pair = pd_pair("nccl", prefill_args=FAST_LINK, decode_args=FAST_LINK)
    proxy = pair["proxy"]
    assert post(proxy).status_code == 200
    for url in (proxy, pair["decode"]):  # no aiohttp error pages anywhere: JSON errors
        for r in (httpx.get(f"{url}/nope"), httpx.post(f"{url}/health")):
            assert r.status_code in (404, 405) and r.json()["error"]["code"] == r.status_code, r.text
    pair.signal("prefill", signal.SIGKILL)
    r = fails_fast(proxy, 503)
    assert "prefill" in r.json()["error"]["message"]
    assert wait_until(lambda: instance_up(proxy, "prefill") == [0.0], timeout=2)
    pair.restart("prefill")
    assert serves_again(proxy, within=10) < 10

    # the proxy dies with a request in flight: its upstream legs end with it, the instances carry on
    s = Stream(proxy, 400)
    s.start()
    assert s.started.wait(15)
    pair.signal("proxy", signal.SIGKILL)
    s.join(10)
    assert s.error is not None or s.lines[-1:] != ["data: [DONE]"]  # cut: the gateway in front reports it
    assert wait_until(lambda: running(pair["decode"]) == 0.0, timeout=5), "the dead proxy's decode leg was not cancelled"
    pair.restart("proxy")
    assert serves_again(proxy, within=10) < 10
    assert_clean_logs(procs)


def test_engine_death_ends_running_requests_cleanly(pd_pair, procs):
    """The seed's decode-side IndexError: running requests end with a clear error, the instance leaves and comes back."""
    pair = pd_pair("nccl", prefill_args=FAST_LINK, decode_args=[*FAST_LINK, "--decode-ms-per-token", "10"])
    proxy = pair["proxy"]
    assert post(proxy).status_code == 200
    stream, whole = both_running(pair, 300)
    pair.signal("decode", signal.SIGUSR1)  # the engine dies now
    stream.join(10)
    whole.join(10)
    assert stream.status == 200 and stream.lines[-1] == "data: [DONE]"
    err = stream.error_event()
    assert err and "EngineDeadError" in err["message"] and "IndexError" in err["message"], stream.lines[-3:]
    assert whole.response is not None and whole.response.status_code == 500, whole.error
    assert "IndexError" in whole.response.json()["error"]["message"]
    assert httpx.get(f"{pair['decode']}/health").status_code == 503  # as vLLM's /health on EngineDeadError
    r = fails_fast(proxy, 503)
    assert "no healthy decode instance" in r.json()["error"]["message"]
    # vLLM's watchdog shuts the server down 5 s after the engine died (no VLLM_KEEP_ALIVE_ON_ENGINE_DEATH)
    assert pair.children["decode"].proc.wait(15) == 1
    assert "EngineCore encountered a fatal error: IndexError" in pair.children["decode"].log_path.read_text()
    pair.restart("decode")
    assert serves_again(proxy, within=10) < 10
    assert_clean_logs(procs)


def test_hung_engine_is_ejected_and_its_requests_end(pd_pair, procs):
    """A hung engine still passes /health: the proxy sees no progress, ejects it and ends its requests with 504."""
    pair = pd_pair("fs", decode_args=["--decode-ms-per-token", "10"], proxy_args=["--stall-timeout", "1", "--base-ejection", "30"])
    proxy = pair["proxy"]
    assert post(proxy).status_code == 200
    stream, whole = both_running(pair, 600)
    t0 = time.monotonic()
    pair.signal("decode", signal.SIGUSR2)  # the engine hangs now
    stream.join(10)
    whole.join(10)
    assert time.monotonic() - t0 < 5, "requests on a hung engine were not ended"
    assert stream.lines[-1] == "data: [DONE]" and "no progress" in stream.error_event()["message"], stream.lines[-3:]
    assert whole.response is not None and whole.response.status_code == 504 and "no progress" in whole.response.json()["error"]["message"]
    assert httpx.get(f"{pair['decode']}/health").status_code == 200  # what vLLM's /health says of a hung engine
    decode = next(i for i in httpx.get(f"{proxy}/health").json()["instances"] if i["role"] == "decode")
    assert decode["state"] == "ejected" and decode["ejections"] == 1 and "no progress" in decode["reason"], decode
    r = fails_fast(proxy, 503)
    assert "ejected" in r.json()["error"]["message"]
    pair.signal("decode", signal.SIGKILL)  # the operator (or kubelet) restarts it: a new process is re-admitted at once
    pair.restart("decode")
    assert serves_again(proxy, within=10) < 10
    assert_clean_logs(procs)


def test_next_request_goes_to_the_other_decode(procs, tmp_path):
    """Two decodes behind one proxy: one killed, every request still answered 200 by the other; back when restarted."""
    from tests.pd.conftest import Pair

    kv = ["--kv-backend", "fs", "--kv-dir", str(tmp_path / "kv")]
    pair = Pair(procs)
    ports = {name: free_port() for name in ("prefill", "decode-a", "decode-b", "proxy")}
    for name in ("decode-a", "decode-b"):
        pair.start(name, ["vllm_sim.cli", "--role", "decode", "--port", str(ports[name]), "--decode-ms-per-token", "2", *kv], ports[name])
    pair.start("prefill", ["vllm_sim.cli", "--role", "prefill", "--port", str(ports["prefill"]), *kv], ports["prefill"])
    pair.start("proxy", ["pd_proxy.cli", "--host", "127.0.0.1", "--port", str(ports["proxy"]), "--mode", "shared-storage", "--kv-backend", "fs",
                         "--prefill", f"http://127.0.0.1:{ports['prefill']}", "--decode", f"http://127.0.0.1:{ports['decode-a']}",
                         "--decode", f"http://127.0.0.1:{ports['decode-b']}", "--scrape-interval", "0.2"], ports["proxy"])
    pair.wait()
    proxy = f"http://127.0.0.1:{ports['proxy']}"
    assert [post(proxy).status_code for _ in range(4)] == [200] * 4
    pair.signal("decode-a", signal.SIGKILL)
    t0 = time.monotonic()
    assert [post(proxy).status_code for _ in range(6)] == [200] * 6  # the first one finds out and is served by decode-b
    assert time.monotonic() - t0 < 6
    assert httpx.get(f"{proxy}/health").status_code == 200  # one decode is enough to serve
    assert sorted(instance_up(proxy, "decode")) == [0.0, 1.0]
    pair.restart("decode-a")
    assert wait_until(lambda: instance_up(proxy, "decode") == [1.0, 1.0], timeout=5)
    assert_clean_logs(procs)
