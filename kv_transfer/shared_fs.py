"""`fs` backend: per-layer tensors on a shared directory keyed by request, removed after load.

The writer finishes every layer file before it writes `meta.json` (atomically, by rename), so a
reader never sees a half-written request. The link model's arrival time is carried in the meta.
A write that fails removes what it wrote and raises `KVTransferError` (the prefill answers an
error at once); a request the decode never loaded (its decode died, or the client left between
the legs) is swept after `ttl` seconds, so the directory cannot fill up.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import re
import shutil
import time
from pathlib import Path

import torch

from kv_transfer.errors import KVTransferError, short_reason
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
        try:
            d.mkdir(parents=True, exist_ok=True)
            for i, t in enumerate(layers):
                torch.save(t.contiguous(), d / f"layer_{i}.pt")
            nbytes = sum(t.numel() * t.element_size() for t in layers)
            meta = {"request_id": request_id, "layers": len(layers), "bytes": nbytes, "ready_at": self.link.schedule(nbytes)}
            tmp = d / "meta.json.tmp"
            tmp.write_text(json.dumps(meta))
            os.replace(tmp, d / "meta.json")
        except (OSError, RuntimeError) as e:
            shutil.rmtree(d, ignore_errors=True)
            raise KVTransferError(f"cannot write the KV cache of request {request_id} to {self.root}: {short_reason(e)}") from None
        return time.perf_counter() - t0


class FsReceiver:
    def __init__(self, root: str | Path, shape: KVShape, poll_interval: float = 0.002, ttl: float = 120.0) -> None:
        self.root, self.shape, self.poll_interval, self.ttl = Path(root), shape, poll_interval, ttl
        self.root.mkdir(parents=True, exist_ok=True)
        self._swept_at = 0.0

    def load(self, request_id: str) -> Received | None:
        d = request_dir(self.root, request_id)
        meta_path = d / "meta.json"
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            layers = [torch.load(d / f"layer_{i}.pt", weights_only=True) for i in range(meta["layers"])]
        except (OSError, ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
            raise KVTransferError(f"the stored KV cache of request {request_id} is unreadable: {short_reason(e)}") from None
        finally:
            shutil.rmtree(d, ignore_errors=True)
        return Received(layers, meta["ready_at"], time.time())

    def sweep(self, now: float | None = None) -> int:
        """Remove request directories older than `ttl` (never loaded); returns how many."""
        cutoff = (time.time() if now is None else now) - self.ttl
        removed = 0
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return 0
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    shutil.rmtree(entry.path, ignore_errors=True)
                    removed += 1
            except OSError:
                continue
        return removed

    async def wait_for(self, request_id: str, timeout: float) -> Received:
        now = time.monotonic()
        if now - self._swept_at > self.ttl / 4:
            self._swept_at = now
            await asyncio.to_thread(self.sweep)
        deadline = now + timeout
        meta_path = request_dir(self.root, request_id) / "meta.json"
        while not meta_path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"KV cache of request {request_id} did not appear in {self.root} within {timeout:g}s "
                                   "(its prefill's write failed, or went to another decode)")
            await asyncio.sleep(self.poll_interval)
        item = await asyncio.to_thread(self.load, request_id)
        if item is None:
            raise KVTransferError(f"the stored KV cache of request {request_id} vanished before it was loaded")
        delay = item.ready_at - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        return item
