"""Real processes for gateway tests: echo upstreams, `epp serve` replicas, and real Envoys rendered from the shared template."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.envoy_config import EnvoySettings, render
from gateway.envoy_process import start_envoy, wait_envoy_ready
from local_stack.processes import Child, ProcessGroup
from tests.conftest import free_port

MAX_BODY = 4 * 1024 * 1024  # the EPP's and Envoy's body limit in these tests (the default 16 MiB costs time)


@dataclass
class Epp:
    child: Child
    grpc: int
    health: int
    metrics: int

    def decisions(self) -> dict[str, list[str]]:
        """request_id → the endpoints the EPP selected, from its `Scoring decision` log."""
        out = {}
        for line in self.child.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"Scoring decision"' in line:
                e = json.loads(line)
                out[e["request_id"]] = e["selected"]
        return out

    def kill(self) -> None:
        os.killpg(self.child.proc.pid, signal.SIGKILL)
        self.child.proc.wait()


@dataclass
class Envoy:
    child: Child
    port: int
    admin: int
    settings: EnvoySettings
    config_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.child.log_path.read_text(errors="replace")

    def access_log(self) -> list[dict]:
        return [json.loads(line) for line in self.log().splitlines() if line.startswith("{")]


def deep_update(into: dict, extra: dict) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            deep_update(into[k], v)
        else:
            into[k] = v


class Rig:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs = ProcessGroup(workdir / "logs")
        self.upstreams: dict[str, int] = {}
        self.endpoints_file = workdir / "endpoints.yaml"

    def upstream(self, name: str, in_pool: bool = True) -> int:
        port = free_port()
        child = self.procs.start(name, ["tests.gateway.echo_upstream", "--port", str(port), "--name", name])
        self.procs.wait_http(child, f"http://127.0.0.1:{port}/health", timeout=30)
        if in_pool:
            self.upstreams[name] = port
            self.endpoints_file.write_text("endpoints:\n" + "".join(
                f"- {{name: {n}, address: 127.0.0.1, port: {p}}}\n" for n, p in self.upstreams.items()))
        return port

    def epp(self, name: str = "epp", *extra: str, grpc: int | None = None) -> Epp:
        g, h, m = grpc or free_port(), free_port(), free_port()
        child = self.procs.start(name, [
            "epp.cli", "serve", "--endpoints-file", str(self.endpoints_file), "--secure-serving=false", "--bind-address", "127.0.0.1",
            "--grpc-port", str(g), "--grpc-health-port", str(h), "--metrics-port", str(m), "--config-profile", "proxy-performance",
            "--max-request-body-bytes", str(MAX_BODY), *extra])
        self.procs.wait_http(child, f"http://127.0.0.1:{m}/metrics", timeout=60)
        return Epp(child, g, h, m)

    def envoy(self, name: str, epp_ports: list[int], wait_for_epps: int | None = None, ext_proc_extra: dict | None = None,
              **overrides) -> Envoy:
        """An Envoy from the shared template; `ext_proc_extra` adds fields to its ext_proc filter (a variant the template does not ship)."""
        port, admin = free_port(), free_port()
        settings = EnvoySettings.local(port, admin, epp_ports, max_request_body_bytes=MAX_BODY, **overrides)
        config = render(settings)
        if ext_proc_extra:
            hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            deep_update(hcm["http_filters"][0]["typed_config"], ext_proc_extra)
        path = self.workdir / f"{name}.yaml"
        child = start_envoy(self.procs, settings, path, name=name, config=config)
        wait_envoy_ready(child, admin, epp_replicas=len(epp_ports) if wait_for_epps is None else wait_for_epps)
        return Envoy(child, port, admin, settings, path)

    def stop(self) -> None:
        self.procs.stop()


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    r = Rig(tmp_path_factory.mktemp("gateway"))
    yield r
    r.stop()
    assert r.procs.alive() == []
