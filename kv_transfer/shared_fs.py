"""`fs` backend: per-layer tensors on a shared directory keyed by request, removed after load.

The writer finishes every layer file before it writes `meta.json` (atomically, by rename), so a
reader never sees a half-written request. The link model's arrival time is carried in the meta.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time
from pathlib import Path

import torch

from kv_transfer.kv_blocks import KVShape
from kv_transfer.link_model import LinkModel
from kv_transfer.p2p import Received

_SAFE = re.compile(r"[^A-Za-z0-9_.:-]")


def request_dir(root: Path, request_id: str) -> Path:
    return root / _SAFE.sub("_", request_id)


class FsSender:
    def __init__(self, root: str | Path, shape: KVShape, link: LinkModel | None = None) -> None:
        self.root, self.shape, self.link = Path(root), shape, link or LinkModel()
        self.root.mkdir(parents=True, exist_ok=True)

    def send(self, request_id: str, layers: list[torch.Tensor]) -> float:
        t0 = time.perf_counter()
        d = request_dir(self.root, request_id)
        d.mkdir(parents=True, exist_ok=True)
        for i, t in enumerate(layers):
            torch.save(t.contiguous(), d / f"layer_{i}.pt")
        nbytes = sum(t.numel() * t.element_size() for t in layers)
        meta = {"request_id": request_id, "layers": len(layers), "bytes": nbytes, "ready_at": self.link.schedule(nbytes)}
        tmp = d / "meta.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, d / "meta.json")
        return time.perf_counter() - t0


class FsReceiver:
    def __init__(self, root: str | Path, shape: KVShape, poll_interval: float = 0.002) -> None:
        self.root, self.shape, self.poll_interval = Path(root), shape, poll_interval
        self.root.mkdir(parents=True, exist_ok=True)

    def load(self, request_id: str) -> Received | None:
        d = request_dir(self.root, request_id)
        meta_path = d / "meta.json"
        if not meta_path.exists():
            return None
        meta = json.loads(meta_path.read_text())
        layers = [torch.load(d / f"layer_{i}.pt", weights_only=True) for i in range(meta["layers"])]
        shutil.rmtree(d, ignore_errors=True)
        return Received(layers, meta["ready_at"], time.time())

    async def wait_for(self, request_id: str, timeout: float) -> Received:
        deadline = time.monotonic() + timeout
        meta_path = request_dir(self.root, request_id) / "meta.json"
        while not meta_path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"KV cache of request {request_id} did not appear in {self.root} within {timeout:g}s")
            await asyncio.sleep(self.poll_interval)
        item = await asyncio.to_thread(self.load, request_id)
        assert item is not None
        delay = item.ready_at - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        return item
