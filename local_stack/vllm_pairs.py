"""P/D pairs of real vLLM CPU servers (topology `engine: vllm`), each behind a pd-proxy.

A `nixl` backend runs two NixlConnector servers and a proxy in `--mode nixl`; an `fs` backend two
ExampleConnector servers sharing a directory and a proxy in `--mode shared-storage` that prunes
it. Every server gets its own free ports (HTTP and, for NIXL, the side channel) from `port` (`stack.late_port`: they bind a minute later).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from local_stack.processes import Child
from vllm_cpu.server import VllmCpu, kv_transfer_config

if TYPE_CHECKING:
    from local_stack.stack import LocalStack
    from local_stack.topology import Backend


def engine_of(stack: "LocalStack") -> VllmCpu:
    v = stack.topology.vllm
    return VllmCpu(served_model_name=stack.topology.model, max_model_len=v.max_model_len, block_size=v.block_size,
                   kv_cache_memory_bytes=v.kv_cache_memory_bytes)


def prepare(stack: "LocalStack", progress) -> VllmCpu:
    """Check the vLLM venv and build the tiny model once (cached in the venv)."""
    engine = engine_of(stack)
    engine.check_installed()
    progress(f"tiny model ready: {engine.ensure_model()}")
    return engine


def start_server(stack: "LocalStack", engine: VllmCpu, name: str, port: int, kv: dict | None, side_port: int | None = None,
                 whole_prefills: bool = False, events: dict | None = None) -> Child:
    return stack.procs.start_command(name, engine.command(port, kv, whole_prefills=whole_prefills, kv_events_config=events),
                                     engine.env(side_port))


def start_pair(stack: "LocalStack", engine: VllmCpu, b: "Backend", i: int, profile: Path | None, port) -> list[tuple[Child, str]]:
    suffix = "" if b.pairs == 1 else f"-{i}"
    name = f"{b.proxy_name}{suffix}"
    http_p, http_d, proxy_port = port(), port(), port()
    policy = stack.topology.vllm.kv_load_failure_policy
    events = stack.kv_events_config(proxy_port)  # the prefill holds the prefix cache; its events name the pair's proxy
    if b.transfer == "nixl":
        p = start_server(stack, engine, f"{name}-prefill", http_p, kv_transfer_config("nixl", "prefill", failure_policy=policy), port(),
                         events=events)
        d = start_server(stack, engine, f"{name}-decode", http_d, kv_transfer_config("nixl", "decode", failure_policy=policy), port())
        mode = ["--mode", "nixl"]
    else:
        store = stack.workdir / "kv" / name
        store.mkdir(parents=True, exist_ok=True)
        p = start_server(stack, engine, f"{name}-prefill", http_p, kv_transfer_config("shared-storage", "prefill", store),
                         whole_prefills=True, events=events)  # ExampleConnector stores a chunked prompt incomplete (vllm_cpu/server.py)
        d = start_server(stack, engine, f"{name}-decode", http_d, kv_transfer_config("shared-storage", "decode", store))
        mode = ["--mode", "shared-storage", "--prefill-service", f"vllm-prefill-{b.label}{suffix}",
                "--decode-service", f"vllm-decode-{b.label}{suffix}", "--shared-storage-path", str(store)]
    prof = ["--profile-file", str(profile)] if profile else []
    x = stack.procs.start(name, ["pd_proxy.cli", "--host", "127.0.0.1", "--port", str(proxy_port), *mode, "--kv-backend", b.label,
                                 "--prefill", f"http://127.0.0.1:{http_p}", "--decode", f"http://127.0.0.1:{http_d}", *prof,
                                 "--scrape-interval", str(stack.topology.proxy_scrape_interval),
                                 "--health-timeout", str(stack.topology.vllm.health_timeout),
                                 "--stall-timeout", str(stack.topology.vllm.first_byte_timeout)])
    from local_stack.stack import ProxyInfo

    stack.proxies.append(ProxyInfo(name, b.label, proxy_port, http_p, http_d))
    return [(d, f"http://127.0.0.1:{http_d}/health"), (p, f"http://127.0.0.1:{http_p}/health"), (x, f"http://127.0.0.1:{proxy_port}/health")]
