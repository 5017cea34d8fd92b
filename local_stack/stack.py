"""Bring up the whole system on 127.0.0.1 and tear it down with nothing left behind."""

from __future__ import annotations

import json
import random
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gateway.envoy_config import EnvoySettings
from gateway.envoy_process import start_envoy, wait_envoy_ready
from local_stack import vllm_pairs
from local_stack.processes import Child, ProcessGroup
from local_stack.topology import Backend, Topology


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def late_port() -> int:
    """A free port for a server that binds it only much later (vLLM: a minute on two cores).

    Outside the kernel's ephemeral range, where no outgoing connection and no other `free_port()`
    on this machine takes it meanwhile (that race left a real NIXL decode without its side channel).
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    rng = random.SystemRandom()
    for _ in range(100 if low > 20100 else 0):
        port = rng.randrange(20000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


LINK_MODELLED = ("nccl", "fs", "pull")  # the simulator's transports, which the profiler runs through the link model


def transport_of(engine: str, transfer: str) -> str:
    """The profiler backend that measures a pair's KV path: the simulator's torch transports, or real vLLM's."""
    if engine == "vllm":
        return {"nixl": "nixl", "fs": "shared-storage"}[transfer]
    return {"nixl": "pull"}.get(transfer, transfer)  # the simulator's NIXL reads blocks over TCP


@dataclass
class ProxyInfo:
    name: str
    label: str
    port: int
    prefill_port: int
    decode_port: int


@dataclass
class StackPorts:
    gateway: int = 18080
    grpc: int = 9002
    grpc_health: int = 9003
    metrics: int = 9090
    envoy_admin: int = 0  # Envoy's admin/stats port; 0 = a free one, chosen at start
    kv_events: int = 0  # where the EPP hears the prefill engines' KV events; 0 = a free port at start


@dataclass
class LocalStack:
    topology: Topology
    profile: str = "proxy-performance"
    workdir: Path = Path(".stack")
    ports: StackPorts = field(default_factory=StackPorts)
    body_mode: str = "FULL_DUPLEX_STREAMED"
    epp_verbosity: int = 2

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.logs = self.workdir / "logs"
        self.procs = ProcessGroup(self.logs)
        self.proxies: list[ProxyInfo] = []
        self.epp: Child | None = None
        self.epp_procs = ProcessGroup(self.logs)
        self.envoy: Child | None = None
        self.pods: dict = {}  # cluster: pod name -> cluster_stack.PodInfo
        self.epp_env: dict[str, str] = {}
        self.epp_args: list[str] = []  # extra `epp serve` flags, e.g. --allow-experimental-plugins

    @property
    def envoy_config(self) -> Path:
        return self.workdir / "envoy.yaml"

    @property
    def envoy_admin_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.envoy_admin}"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.gateway}"

    @property
    def epp_log(self) -> Path:
        return self.logs / "epp.log"

    @property
    def endpoints_file(self) -> Path:
        return self.workdir / "endpoints.yaml"

    # -- bring-up ------------------------------------------------------------------------------
    def start(self, progress=print) -> None:
        try:
            self._start(progress)
        except BaseException:
            self.stop()
            raise

    def _start(self, progress) -> None:
        t = self.topology
        self.workdir.mkdir(parents=True, exist_ok=True)
        for old in self.logs.glob("*.log"):  # one run's logs per start, so `epp decisions` reads this run
            old.unlink()
        if not self.ports.kv_events:
            self.ports.kv_events = late_port()  # bound once the engines are up
        engine = vllm_pairs.prepare(self, progress) if t.engine == "vllm" else None
        pending: list[tuple[Child, str]] = []
        if t.cluster is not None:
            from local_stack.cluster_stack import start_cluster

            pending = start_cluster(self, progress)
        else:
            profiles = self._profile_backends(progress) if t.profile_kv_transfer else {}
            for backend in t.backends:
                for i in range(backend.pairs):
                    prof = profiles.get(backend.label)
                    pending.extend(vllm_pairs.start_pair(self, engine, backend, i, prof, late_port) if engine
                                   else self._start_pair(backend, i, prof))
        if engine:
            progress(f"{len(pending) * 2 // 3} vLLM servers starting (≈25–80 s each on two cores)")
        for child, url in pending:
            self.procs.wait_http(child, url, timeout=t.vllm.start_timeout if engine else 90)
        if t.cluster is not None:
            progress("pods ready: " + ", ".join(f"{p.name} ({p.role}, {p.node}) :{p.endpoint_port}" for p in self.pods.values()))
        else:
            progress(f"{len(self.proxies)} proxies ready: " + ", ".join(f"{p.name} ({p.label}) :{p.port}" for p in self.proxies))
            self.write_endpoints()
        self.start_epp(self.profile)
        self.start_gateway()
        progress(f"Envoy ready on {self.gateway_url} (ext_proc {self.body_mode}; admin and stats {self.envoy_admin_url}/stats)")

    def start_gateway(self) -> None:
        """Real Envoy in front of the EPP, its config rendered from the one shared template (gateway/envoy_config.py)."""
        if not self.ports.envoy_admin:
            self.ports.envoy_admin = free_port()
        settings = EnvoySettings.local(self.ports.gateway, self.ports.envoy_admin, [self.ports.grpc], body_mode=self.body_mode)
        self.envoy = start_envoy(self.procs, settings, self.envoy_config)
        wait_envoy_ready(self.envoy, self.ports.envoy_admin)

    def _profile_backends(self, progress) -> dict[str, Path]:
        """Profile each backend with the sims' own shape and link model (a short run of kv-bandwidth-profiler)."""
        t = self.topology
        out = {}
        for b in t.backends:
            dest = self.workdir / "profiles" / b.label
            transport = transport_of(t.engine, b.transfer)
            args = ["bandwidth_profiler.cli", "--backends", transport, "--label", b.label, "--min-blocks", "1", "--max-blocks", "256",
                    "--num-points", "7", "--num-samples", "5", "--warmup-blocks", "4", "--output-dir", str(dest),
                    "--fs-dir", str(self.workdir / "kv-profile"), "--no-progress",
                    *([f"--{transport}-link-gbps", str(b.link_gbps), f"--{transport}-link-latency-ms", str(b.link_latency_ms)]
                      if transport in LINK_MODELLED else []),
                    "--num-layers", str(t.shape.num_layers), "--num-kv-heads", str(t.shape.num_kv_heads), "--head-dim", str(t.shape.head_dim),
                    "--block-size", str(t.shape.block_size), "--dtype", t.shape.dtype]
            self.procs.run(f"profile-{b.label}", args, timeout=300)
            path = dest / f"{transport}.json"
            pts = json.loads(path.read_text())["points"]
            out[b.label] = path
            progress(f"profiled {b.label} ({b.transfer}): {pts[0]['blocks']} blocks {pts[0]['seconds'] * 1000:.1f} ms … "
                     f"{pts[-1]['blocks']} blocks {pts[-1]['seconds'] * 1000:.1f} ms")
        return out

    def _start_pair(self, b: Backend, i: int, profile: Path | None) -> list[tuple[Child, str]]:
        t = self.topology
        suffix = "" if b.pairs == 1 else f"-{i}"
        name = f"{b.proxy_name}{suffix}"
        http_p, http_d, kv_port, proxy_port = free_port(), free_port(), free_port(), free_port()
        lat = b.latency or t.latency
        common = ["--model", t.model, "--kv-backend", b.transfer, "--kv-dir", str(self.workdir / "kv" / name),
                  "--link-gbps", str(b.link_gbps), "--link-latency-ms", str(b.link_latency_ms), *lat.sim_flags(),
                  "--num-layers", str(t.shape.num_layers), "--num-kv-heads", str(t.shape.num_kv_heads), "--head-dim", str(t.shape.head_dim),
                  "--block-size", str(t.shape.block_size), "--dtype", t.shape.dtype]
        seed = 100 * t.backends.index(b) + 2 * i  # each instance its own noise
        kv_d, kv_p = (["--kv-port", str(kv_port)], []) if b.transfer != "nixl" else ([], ["--kv-port", str(kv_port)])
        d = self.procs.start(f"{name}-decode", ["vllm_sim.cli", "--role", "decode", "--port", str(http_d), *kv_d, "--seed", str(seed), *common])
        # the prefill engine holds the prefix cache; its KV events name the pair's proxy, the EPP's endpoint
        p = self.procs.start(f"{name}-prefill", ["vllm_sim.cli", "--role", "prefill", "--port", str(http_p), *kv_p, "--seed", str(seed + 1),
                                                 "--kv-events-config", json.dumps(self.kv_events_config(proxy_port)), *common])
        if b.transfer == "nixl":
            mode = ["--mode", "nixl", "--prefill", f"http://127.0.0.1:{http_p}", "--decode", f"http://127.0.0.1:{http_d}"]
        elif b.transfer == "nccl":
            mode = ["--mode", "p2p-nccl", "--prefill", f"http://127.0.0.1:{http_p}=127.0.0.1:{free_port()}",
                    "--decode", f"http://127.0.0.1:{http_d}=127.0.0.1:{kv_port}"]
        else:
            mode = ["--mode", "shared-storage", "--prefill", f"http://127.0.0.1:{http_p}", "--decode", f"http://127.0.0.1:{http_d}",
                    "--prefill-service", f"vllm-prefill-{b.label}{suffix}", "--decode-service", f"vllm-decode-{b.label}{suffix}"]
        prof = ["--profile-file", str(profile)] if profile else []
        x = self.procs.start(name, ["pd_proxy.cli", "--host", "127.0.0.1", "--port", str(proxy_port), *mode, "--kv-backend", b.label, *prof,
                                    "--scrape-interval", str(t.proxy_scrape_interval)])
        self.proxies.append(ProxyInfo(name, b.label, proxy_port, http_p, http_d))
        return [(d, f"http://127.0.0.1:{http_d}/health"), (p, f"http://127.0.0.1:{http_p}/health"), (x, f"http://127.0.0.1:{proxy_port}/health")]

    def write_endpoints(self) -> None:
        eps = [{"name": p.name, "address": "127.0.0.1", "port": p.port, "labels": {"role": "proxy", "llm-d.ai/kv-backend": p.label}}
               for p in self.proxies]
        self.endpoints_file.write_text(yaml.safe_dump({"endpoints": eps}, sort_keys=False))

    def start_epp(self, profile: str) -> None:
        """(Re)start only the EPP, e.g. to compare profiles on the same running backends."""
        self.stop_epp()
        self.profile = profile
        config = ["--config-file", str(Path(profile).resolve())] if profile.endswith((".yaml", ".yml")) else ["--config-profile", profile]
        self.epp = self.epp_procs.start("epp", [
            "epp.cli", "serve", "--endpoints-file", str(self.endpoints_file), *config, "--secure-serving=false",
            "--bind-address", "127.0.0.1", "--grpc-port", str(self.ports.grpc), "--grpc-health-port", str(self.ports.grpc_health),
            "--metrics-port", str(self.ports.metrics), "-v", str(self.epp_verbosity), *self.epp_args,
        ], env={"EPP_PROFILES_DIR": str(self._epp_profiles()), **self.epp_env})
        self.epp_procs.wait_http(self.epp, f"http://127.0.0.1:{self.ports.metrics}/metrics", timeout=60)
        _wait_grpc_serving(self.epp, self.ports.grpc_health)
        if self.envoy is not None and self.envoy.proc.poll() is None:
            wait_envoy_ready(self.envoy, self.ports.envoy_admin)  # Envoy's health check has seen the new EPP

    def kv_events_config(self, endpoint_port: int) -> dict:
        """vLLM's `--kv-events-config` for an engine behind the endpoint on `endpoint_port` (simulated or real)."""
        return {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://127.0.0.1:{self.ports.kv_events}",
                "topic": f"kv@127.0.0.1:{endpoint_port}@{self.topology.model}"}

    def _epp_profiles(self) -> Path:
        """The named profiles, with any KV-events `zmqEndpoint` pointed at this stack's port (as a Helm chart would)."""
        from epp.config.loader import profiles_dir

        out = self.workdir / "epp-profiles"
        out.mkdir(parents=True, exist_ok=True)
        for src in profiles_dir().glob("*.yaml"):
            text = src.read_text()
            if "zmqEndpoint" in text:
                text = re.sub(r"(zmqEndpoint:\s*[\"']?tcp://)[^:\s\"']+:\d+", rf"\g<1>127.0.0.1:{self.ports.kv_events}", text)
            if self.topology.engine == "vllm":
                text = _patient_health(text, self.topology.vllm)
            (out / src.name).write_text(text)
        return out

    def reset_prefix_caches(self) -> None:
        """Empty every engine's prefix cache (vLLM's /reset_prefix_cache), so runs compared start alike."""
        ports = [port for p in self.proxies for port in (p.prefill_port, p.decode_port)] + [p.engine_port for p in self.pods.values()]
        for port in ports:
            for _ in range(50):  # refused while a request still holds blocks: wait for it to finish
                if _reset_prefix_cache(port):
                    break
                time.sleep(0.2)

    def prefix_cache_counters(self) -> dict[str, float]:
        """Prompt tokens looked up and found in the prefill engines' prefix caches, summed (vllm:prefix_cache_*)."""
        out = {"queries": 0.0, "hits": 0.0}
        for p in self.proxies:
            with urllib.request.urlopen(f"http://127.0.0.1:{p.prefill_port}/metrics", timeout=5) as r:
                text = r.read().decode()
            for line in text.splitlines():
                for key in out:
                    if line.startswith(f"vllm:prefix_cache_{key}_total"):
                        out[key] += float(line.rsplit(" ", 1)[1])
        return out

    def stop_epp(self) -> None:
        self.epp_procs.stop()
        self.epp = None

    def stop(self) -> None:
        self.stop_epp()
        self.procs.stop()

    def alive(self) -> list[str]:
        return self.procs.alive() + self.epp_procs.alive()

    def backend_of(self, served: str) -> str:
        port = int(served.rsplit(":", 1)[1]) if ":" in served else -1
        return next((p.label for p in self.proxies if p.port == port), None) or next(
            (p.kv_backend for p in self.pods.values() if p.endpoint_port == port), "unknown")

    def name_of(self, served: str) -> str:
        port = int(served.rsplit(":", 1)[1]) if ":" in served else -1
        return next((p.name for p in self.proxies if p.port == port), None) or next(
            (p.name for p in self.pods.values() if p.endpoint_port == port), served)


def _patient_health(text: str, v) -> str:
    """Real vLLM on a few CPU cores starves the proxies beside it and is slow to a first token: the profiles'
    readiness deadline becomes the engine's `health_timeout` (three misses in a row) and the first-byte and
    stream-idle watchdogs its `first_byte_timeout`, so healthy but busy pairs are neither unready nor ejected."""
    data = yaml.safe_load(text)
    changed = False
    for plugin in (data or {}).get("plugins") or []:
        if plugin.get("type") == "endpoint-health":
            params = plugin["parameters"] = plugin.get("parameters") or {}
            params.setdefault("readiness", {}).update(timeout=f"{v.health_timeout:g}s", unhealthyThreshold=3)
            params.update(firstByteTimeout=f"{v.first_byte_timeout:g}s", streamIdleTimeout=f"{v.first_byte_timeout:g}s")
            changed = True
    return yaml.safe_dump(data, sort_keys=False) if changed else text


def _reset_prefix_cache(port: int) -> bool:
    """POST /reset_prefix_cache; False while requests hold blocks (the simulator's 409, real vLLM's `success: false`)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/reset_prefix_cache", method="POST"), timeout=5) as r:
            body = r.read()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise RuntimeError(f"the engine on :{port} has no /reset_prefix_cache (real vLLM serves it with VLLM_SERVER_DEV_MODE=1)") from None
        if e.code != 409:
            raise
        return False
    try:
        return json.loads(body).get("success", True) is not False
    except (ValueError, AttributeError):
        return True  # the simulator answers an empty body


def _wait_grpc_serving(child: Child, port: int, timeout: float = 30.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if child.proc.poll() is not None:
                raise RuntimeError(f"{child.name} exited; see {child.log_path}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{child.name} health not SERVING on {port}")
