import pytest

from local_stack.processes import ProcessGroup
from tests.conftest import free_port


@pytest.fixture
def procs(tmp_path):
    group = ProcessGroup(tmp_path / "logs")
    yield group
    group.stop()
    assert group.alive() == []


@pytest.fixture
def pd_pair(procs, tmp_path):
    """Start prefill + decode simulators and a proxy for one backend; returns the proxy URL and details."""

    def start(backend: str, *, prefill_args=(), decode_args=(), proxy_args=(), link_gbps=0.0):
        http_p, http_d, kv_port, proxy_port = free_port(), free_port(), free_port(), free_port()
        kv = ["--kv-backend", "nccl" if backend == "nccl" else "fs", "--kv-dir", str(tmp_path / "kv"), "--link-gbps", str(link_gbps)]
        d = procs.start("decode", ["vllm_sim.cli", "--role", "decode", "--port", str(http_d), "--kv-port", str(kv_port), "--decode-ms-per-token", "2", *kv, *decode_args])
        p = procs.start("prefill", ["vllm_sim.cli", "--role", "prefill", "--port", str(http_p), *kv, *prefill_args])
        if backend == "nccl":
            mode = ["--mode", "p2p-nccl", "--prefill", f"http://127.0.0.1:{http_p}=127.0.0.1:{free_port()}",
                    "--decode", f"http://127.0.0.1:{http_d}=127.0.0.1:{kv_port}", "--kv-backend", "nvlink"]
        else:
            mode = ["--mode", "shared-storage", "--prefill", f"http://127.0.0.1:{http_p}", "--decode", f"http://127.0.0.1:{http_d}",
                    "--kv-backend", "fs", "--prefill-service", "vllm-prefill-fs", "--decode-service", "vllm-decode-fs"]
        x = procs.start("proxy", ["pd_proxy.cli", "--host", "127.0.0.1", "--port", str(proxy_port), *mode, "--scrape-interval", "0.2", *proxy_args])
        for child, port in ((d, http_d), (p, http_p), (x, proxy_port)):
            procs.wait_http(child, f"http://127.0.0.1:{port}/health", timeout=60)
        return {"proxy": f"http://127.0.0.1:{proxy_port}", "prefill": f"http://127.0.0.1:{http_p}", "decode": f"http://127.0.0.1:{http_d}",
                "kv_port": kv_port}

    return start
