"""The local stack's shape: P/D pairs per KV backend, link speeds, model shape, latency model.

Defaults give one pair per backend, the fs link capped at 10 MB/s + 5 ms so that for typical
prompts (300–1,000 tokens, 0.6–2 MB of KV in the default shape) it is ~10× slower than the nccl
path, which runs at the real copy speed (the seed's NVLink-vs-storage gap, scaled to what a CPU
can move). Override any field
with a YAML file (`epp-stack up --topology FILE`); unknown keys are errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelShape(Strict):
    num_layers: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    block_size: int = 16
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"


class Latency(Strict):
    prefill_tokens_per_second: float = 20000.0
    decode_ms_per_token: float = 10.0
    batch_slowdown: float = 0.05
    max_num_seqs: int = 32
    num_gpu_blocks: int = 4096  # KV blocks per instance: the prefix cache's capacity


class Backend(Strict):
    label: str  # llm-d.ai/kv-backend value
    transfer: Literal["nccl", "fs"]
    proxy_name: str
    pairs: int = Field(1, ge=1, le=8)
    link_gbps: float = 0.0  # 0 = the real copy only
    link_latency_ms: float = 0.0


class Topology(Strict):
    model: str = "meta-llama/Llama-3.1-8B-Instruct"
    shape: ModelShape = ModelShape()
    latency: Latency = Latency()
    profile_kv_transfer: bool = True  # profile each backend at start and publish it through the proxies
    proxy_scrape_interval: float = Field(1.0, gt=0)  # how often each proxy re-reads its engines' vllm:* gauges (s)
    backends: list[Backend] = [
        Backend(label="nvlink", transfer="nccl", proxy_name="vllm-p2p-proxy"),
        Backend(label="fs", transfer="fs", proxy_name="vllm-fs-proxy", link_gbps=0.01, link_latency_ms=5.0),
    ]


def load_topology(path: str | None) -> Topology:
    if path is None:
        return Topology()
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
        return Topology.model_validate(data)
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read topology {path}: {e}") from None
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ValueError(f"{path}: {problems}") from None
