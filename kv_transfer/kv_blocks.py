"""KV-cache blocks of a model shape: sizes, deterministic contents, and verification.

Contents are derived from the request id, so the decode side can check every byte it
received without the prefill side sending a checksum.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class KVShape:
    """Per-layer KV layout: (2 [K,V], blocks, block_size, kv_heads, head_dim)."""

    num_layers: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    block_size: int = 16
    dtype: str = "float16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers (what a transfer of N blocks moves, ×N)."""
        elem = torch.tensor([], dtype=self.torch_dtype).element_size()
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * elem * self.num_layers

    def blocks_for(self, tokens: int) -> int:
        return max(1, math.ceil(tokens / self.block_size))

    def layer_shape(self, blocks: int) -> tuple[int, ...]:
        return (2, blocks, self.block_size, self.num_kv_heads, self.head_dim)


def _seed(request_id: str, layer: int) -> int:
    return zlib.crc32(f"{request_id}/{layer}".encode())


def make_kv(request_id: str, blocks: int, shape: KVShape) -> list[torch.Tensor]:
    """The per-layer KV tensors a prefill of `blocks` blocks produces for this request."""
    out = []
    for layer in range(shape.num_layers):
        g = torch.Generator().manual_seed(_seed(request_id, layer))
        out.append(torch.randn(shape.layer_shape(blocks), generator=g, dtype=torch.float32).to(shape.torch_dtype))
    return out


def verify_kv(request_id: str, layers: list[torch.Tensor], shape: KVShape) -> None:
    """Raise ValueError unless `layers` are exactly what the prefill produced for this request."""
    if len(layers) != shape.num_layers:
        raise ValueError(f"expected {shape.num_layers} layers, got {len(layers)}")
    blocks = layers[0].shape[1]
    expected = make_kv(request_id, blocks, shape)
    for i, (got, want) in enumerate(zip(layers, expected)):
        if got.shape != want.shape or got.dtype != want.dtype or not torch.equal(got, want):
            raise ValueError(f"KV layer {i} of request {request_id} does not match what the prefill sent")
