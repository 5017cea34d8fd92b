"""Envoy as a supervised child: render its config, start it, wait until it can route, read its admin API."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from gateway.envoy_config import EPP_CLUSTER, EnvoySettings, render_yaml
from local_stack.processes import Child, ProcessGroup, tail


def admin_get(admin_port: int, path: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}{path}", timeout=timeout) as r:
        return r.read().decode()


def epp_hosts_healthy(admin_port: int) -> list[str]:
    """EPP replicas Envoy would send ext_proc streams to now (admin /clusters: health_flags::healthy)."""
    out = []
    for line in admin_get(admin_port, "/clusters").splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == EPP_CLUSTER and parts[2] == "health_flags" and parts[3] == "healthy":
            out.append(parts[1])
    return out


def start_envoy(procs: ProcessGroup, settings: EnvoySettings, config_path: Path, name: str = "envoy",
                log_level: str = "warning", config: dict | None = None, extra_args: tuple[str, ...] = ()) -> Child:
    """Write the config (`settings` rendered, or `config` as given) and start Envoy.

    Its stdout (the JSON access log) and stderr go to `<logs>/<name>.log`.
    """
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(render_yaml(settings) if config is None else yaml.safe_dump(config, sort_keys=False))
    # --disable-hot-restart: several Envoys on one machine (tests, helpers) must not share the hot-restart socket.
    # --file-flush-interval-msec: the access log reaches the file within 0.2 s (Envoy's default: 10 s).
    return procs.start(name, ["gateway.envoy_binary", "-c", str(config_path), "--log-level", log_level,
                              "--disable-hot-restart", "--file-flush-interval-msec", "200",
                              "--log-format", "[%Y-%m-%d %T.%e][%l][%n] %v", *extra_args])


def wait_envoy_ready(child: Child, admin_port: int, timeout: float = 30.0, epp_replicas: int = 1) -> None:
    """Until Envoy is LIVE and its health check has found `epp_replicas` EPP replicas SERVING."""
    deadline = time.monotonic() + timeout
    state = "not answering"
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise RuntimeError(f"Envoy exited with {child.proc.returncode}; log {child.log_path}:\n{tail(child.log_path)}")
        try:
            if admin_get(admin_port, "/ready").strip() != "LIVE":
                state = "not LIVE"
            elif len(healthy := epp_hosts_healthy(admin_port)) < epp_replicas:
                state = f"{len(healthy)}/{epp_replicas} EPP replicas healthy"
            else:
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"Envoy not ready after {timeout:g}s ({state}); log {child.log_path}:\n{tail(child.log_path)}")
