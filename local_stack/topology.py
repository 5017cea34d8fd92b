"""The local stack's shape: the engine, P/D pairs per KV backend, link speeds, model shape, latency model.

Defaults give one pair per backend, the fs link capped at 10 MB/s + 5 ms so that for typical
prompts (300–1,000 tokens, 0.6–2 MB of KV in the default shape) it is ~10× slower than the nccl
path, which runs at the real copy speed (the seed's NVLink-vs-storage gap, scaled to what a CPU
can move). Override any field
with a YAML file (`epp-stack up --topology FILE`); unknown keys are errors.

`engine: vllm` runs real vLLM CPU servers (`make vllm-setup`) serving the tiny local model
instead of simulators: a NIXL pair (label nvlink, the fast fabric here) and a shared-storage pair
(ExampleConnector, label fs). Their transfers run at this machine's real speed (no link model),
and the model shape is the tiny model's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from local_stack.cluster import Cluster


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelShape(Strict):
    num_layers: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    block_size: int = 16
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"


class Latency(Strict):
    """The simulators' engine: the scorer's model at the defaults; the rest is what real engines add (vllm_sim/engine.py)."""

    prefill_tokens_per_second: float = Field(20000.0, gt=0)
    decode_ms_per_token: float = Field(10.0, gt=0)
    batch_slowdown: float = Field(0.05, ge=0)
    max_num_seqs: int = Field(32, ge=1)
    num_gpu_blocks: int = Field(4096, ge=1)  # KV blocks per instance: the prefix cache's capacity; fewer: sequences are preempted
    max_num_batched_tokens: int = Field(2048, ge=1)
    speed_noise: float = Field(0.0, ge=0)  # sigma of a per-step lognormal factor
    slow_every: float = Field(0.0, ge=0)  # seconds between slow phases
    slow_for: float = Field(0.0, ge=0)
    slow_factor: float = Field(1.0, ge=1)

    def sim_flags(self) -> list[str]:
        return ["--prefill-tokens-per-second", str(self.prefill_tokens_per_second), "--decode-ms-per-token", str(self.decode_ms_per_token),
                "--batch-slowdown", str(self.batch_slowdown), "--max-num-seqs", str(self.max_num_seqs),
                "--num-gpu-blocks", str(self.num_gpu_blocks), "--max-num-batched-tokens", str(self.max_num_batched_tokens),
                "--speed-noise", str(self.speed_noise), "--slow-every", str(self.slow_every), "--slow-for", str(self.slow_for),
                "--slow-factor", str(self.slow_factor)]


class VllmEngine(Strict):
    """Settings of the real vLLM servers (engine: vllm)."""

    max_model_len: int = 4096
    block_size: int = 32
    kv_cache_memory_bytes: int = Field(128 * 2**20, ge=16 * 2**20)
    kv_load_failure_policy: Literal["fail", "recompute"] = "fail"  # the decodes' own policy (vLLM's default: fail)
    start_timeout: float = 300.0
    # vLLM on a few CPU cores answers /health late and takes long to a first token while it serves others:
    # the proxies' and the EPP's health deadlines for the real engine (the simulator keeps the shipped ones)
    health_timeout: float = Field(10.0, gt=0)  # an engine's /health (proxy) and a proxy's /health (EPP readiness), s
    first_byte_timeout: float = Field(120.0, gt=0)  # the EPP's first-byte watchdog and the proxy's stall deadline, s

    @field_validator("block_size")
    @classmethod
    def _cpu_block_size(cls, v: int) -> int:
        if v <= 0 or v % 32:
            raise ValueError("vLLM's CPU attention backend needs a block size that is a multiple of 32")
        return v


class Backend(Strict):
    label: str  # llm-d.ai/kv-backend value
    transfer: Literal["nccl", "fs", "nixl"]
    proxy_name: str
    pairs: int = Field(1, ge=1, le=8)
    link_gbps: float = 0.0  # 0 = the real copy only
    link_latency_ms: float = 0.0
    latency: Latency | None = None  # this backend's simulators, instead of the topology's latency


VLLM_BACKENDS = [
    {"label": "nvlink", "transfer": "nixl", "proxy_name": "vllm-nixl-proxy"},
    {"label": "fs", "transfer": "fs", "proxy_name": "vllm-fs-proxy"},
]
VLLM_SHAPE = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 64, "block_size": 32, "dtype": "float32"}  # vllm_cpu/tiny_model.py


class Topology(Strict):
    engine: Literal["sim", "vllm"] = "sim"
    vllm: VllmEngine = VllmEngine()
    model: str = "meta-llama/Llama-3.1-8B-Instruct"
    shape: ModelShape = ModelShape()
    latency: Latency = Latency()
    profile_kv_transfer: bool = True  # profile each backend at start and publish it through the proxies
    proxy_scrape_interval: float = Field(1.0, gt=0)  # how often each proxy re-reads its engines' vllm:* gauges (s)
    cluster: Cluster | None = None  # a P/D cluster the llm-d way (pods + sidecars + links) instead of proxy pairs per backend
    backends: list[Backend] = [
        Backend(label="nvlink", transfer="nccl", proxy_name="vllm-p2p-proxy"),
        Backend(label="fs", transfer="fs", proxy_name="vllm-fs-proxy", link_gbps=0.01, link_latency_ms=5.0),
    ]

    @model_validator(mode="before")
    @classmethod
    def _engine_defaults(cls, data):
        """With engine: vllm, what is not given is the real engine's: its backends, the tiny model's name and shape."""
        if isinstance(data, dict) and data.get("engine") == "vllm":
            data = {"backends": VLLM_BACKENDS, "model": "tiny-llama", **data}
            data["shape"] = {**VLLM_SHAPE, "block_size": (data.get("vllm") or {}).get("block_size", 32)}
        return data

    @model_validator(mode="after")
    def _engine_fits(self):
        if self.cluster is not None and self.engine != "sim":
            raise ValueError("cluster: runs simulator engines (engine: sim); real vLLM runs the proxy pairs")
        for b in self.backends:
            if self.engine == "vllm" and b.transfer == "nccl":
                raise ValueError(f"backend {b.label}: vLLM has no P2P NCCL connector any more; use transfer: nixl")
            if self.engine == "vllm" and b.latency is not None:
                raise ValueError(f"backend {b.label}: latency settings are the simulator's; real vLLM runs at its own speed")
            if self.engine == "vllm" and (b.link_gbps or b.link_latency_ms):
                raise ValueError(f"backend {b.label}: real vLLM's transfers run at this machine's speed; drop link_gbps/link_latency_ms")
        return self


def load_topology(path: str | None, engine: str | None = None) -> Topology:
    """The topology of a YAML file (or the defaults); `engine` (sim | vllm), when given, overrides the file's."""
    try:
        data = (yaml.safe_load(Path(path).read_text()) or {}) if path is not None else {}
        if engine is not None:
            data["engine"] = engine
        return Topology.model_validate(data)
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read topology {path}: {e}") from None
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ValueError(f"{path or 'topology'}: {problems}") from None
