"""Moving a request's KV cache from a prefill to a decode instance, on torch.

Two backends with one interface: `nccl` (torch.distributed point-to-point send/recv of
per-layer tensors; NCCL on GPUs, gloo on CPU) and `fs` (per-layer tensors on a shared
directory keyed by request). Both take a `LinkModel` so one machine can emulate the
NVLink-vs-storage bandwidth ratio of a real cluster.
"""

from kv_transfer.errors import KVTransferError
from kv_transfer.kv_blocks import KVShape, make_kv, verify_kv
from kv_transfer.link_model import LinkModel

__all__ = ["KVShape", "KVTransferError", "LinkModel", "make_kv", "verify_kv"]
