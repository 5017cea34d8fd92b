import os
import signal

import pytest

from local_stack.processes import ProcessGroup
from tests.conftest import free_port


@pytest.fixture
def procs(tmp_path):
    group = ProcessGroup(tmp_path / "logs")
    yield group
    group.stop()
    assert group.alive() == []


class Pair:
    """A started prefill + decode + proxy; each can be signalled and restarted with its own command and ports."""

    def __init__(self, procs: ProcessGroup) -> None:
        self.procs = procs
        self.specs: dict[str, tuple[list[str], str]] = {}  # name -> (args, health URL)
        self.children: dict = {}
        self.urls: dict[str, str] = {}
        self.extra: dict = {}

    def __getitem__(self, key: str):
        return self.urls[key] if key in self.urls else self.extra[key]

    def start(self, name: str, args: list[str], port: int) -> None:
        self.specs[name] = (args, f"http://127.0.0.1:{port}/health")
        self.children[name] = self.procs.start(name, args)

    def wait(self, *names: str, timeout: float = 60) -> None:
        for name in names or tuple(self.children):
            self.procs.wait_http(self.children[name], self.specs[name][1], timeout=timeout)

    def signal(self, name: str, sig: int = signal.SIGKILL) -> None:
        os.killpg(self.children[name].proc.pid, sig)
        if sig == signal.SIGKILL:
            self.children[name].proc.wait(10)

    def restart(self, name: str, wait: bool = True) -> None:
        args, _ = self.specs[name]
        self.children[name] = self.procs.start(name, args)  # same log file, appended
        if wait:
            self.wait(name)


@pytest.fixture
def pd_pair(procs, tmp_path):
    """Start prefill + decode simulators and a proxy for one backend; returns a `Pair` (URLs by key, processes by name)."""

    def start(backend: str, *, prefill_args=(), decode_args=(), proxy_args=(), link_gbps=0.0) -> Pair:
        http_p, http_d, kv_port, proxy_port = free_port(), free_port(), free_port(), free_port()
        kv = ["--kv-backend", "nccl" if backend == "nccl" else "fs", "--kv-dir", str(tmp_path / "kv"), "--link-gbps", str(link_gbps)]
        pair = Pair(procs)
        pair.start("decode", ["vllm_sim.cli", "--role", "decode", "--port", str(http_d), "--kv-port", str(kv_port), "--decode-ms-per-token", "2",
                              *kv, *decode_args], http_d)
        pair.start("prefill", ["vllm_sim.cli", "--role", "prefill", "--port", str(http_p), *kv, *prefill_args], http_p)
        if backend == "nccl":
            mode = ["--mode", "p2p-nccl", "--prefill", f"http://127.0.0.1:{http_p}=127.0.0.1:{free_port()}",
                    "--decode", f"http://127.0.0.1:{http_d}=127.0.0.1:{kv_port}", "--kv-backend", "nvlink"]
        else:
            mode = ["--mode", "shared-storage", "--prefill", f"http://127.0.0.1:{http_p}", "--decode", f"http://127.0.0.1:{http_d}",
                    "--kv-backend", "fs", "--prefill-service", "vllm-prefill-fs", "--decode-service", "vllm-decode-fs"]
        pair.start("proxy", ["pd_proxy.cli", "--host", "127.0.0.1", "--port", str(proxy_port), *mode, "--scrape-interval", "0.2", *proxy_args],
                   proxy_port)
        pair.wait("decode", "prefill", "proxy")
        pair.urls = {"proxy": f"http://127.0.0.1:{proxy_port}", "prefill": f"http://127.0.0.1:{http_p}", "decode": f"http://127.0.0.1:{http_d}"}
        pair.extra = {"kv_port": kv_port}
        return pair

    return start
