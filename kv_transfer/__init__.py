"""Moving a request's KV cache from a prefill to a decode instance, on torch.

Two backends with one interface: `nccl` (torch.distributed point-to-point send/recv of
per-layer tensors; NCCL on GPUs, gloo on CPU) and `fs` (per-layer tensors on a shared
directory keyed by request). Both take a `LinkModel` so one machine can emulate the
NVLink-vs-storage bandwidth ratio of a real cluster.

torch's C++ side logs every failed connection attempt with a C++ stack trace; each failure here
surfaces as a one-line `KVTransferError` instead, so those logs are off unless TORCH_CPP_LOG_LEVEL
says otherwise (it only takes effect when set before torch is first imported).
"""

import os

os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")

from kv_transfer.errors import KVTransferError  # noqa: E402 -- after the log level, which torch reads on import
from kv_transfer.kv_blocks import KVShape, make_kv, verify_kv  # noqa: E402
from kv_transfer.link_model import LinkModel  # noqa: E402

__all__ = ["KVShape", "KVTransferError", "LinkModel", "make_kv", "verify_kv"]
