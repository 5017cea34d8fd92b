"""Pruning vLLM's shared-storage KV store, which vLLM itself never cleans.

vLLM's ExampleConnector writes each prompt's whole KV blocks to `<shared_storage_path>/<hash of
the prompt tokens>/<layer>.safetensors` and never removes them (the decode writes there too), so
the directory grows with every distinct prompt. The proxy in front of the pair removes entries
written more than `ttl` seconds ago. vLLM reuses an entry without touching it (a prefill that
finds its prompt's folder stores nothing), so an entry removed between a prefill finding it and
its decode loading it makes that decode compute the prompt — once, and the proxy's token-source
check reports it. Hence a long default (an hour): the race needs a prompt repeated just then.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path


def prune(root: Path, ttl: float, now: float | None = None) -> tuple[int, int]:
    """Remove entries older than `ttl`; returns (entries removed, bytes freed)."""
    now = time.time() if now is None else now
    removed = freed = 0
    try:
        entries = list(root.iterdir())
    except OSError:
        return 0, 0
    for entry in entries:
        try:
            files = [entry] if entry.is_file() else [f for f in entry.rglob("*") if f.is_file()]
            newest = max((f.stat().st_mtime for f in files), default=entry.stat().st_mtime)
            if now - newest < ttl:
                continue
            size = sum(f.stat().st_size for f in files)
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue  # written or removed meanwhile: next round
        removed += 1
        freed += size
    return removed, freed


class StorePruner:
    def __init__(self, path: str, ttl: float) -> None:
        self.root, self.ttl = Path(path), ttl
        self._task: asyncio.Task | None = None
        self.removed = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    def stop(self) -> None:
        if self._task:
            self._task.cancel()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, min(60.0, self.ttl / 4)))
            n, _ = await asyncio.to_thread(prune, self.root, self.ttl)
            self.removed += n
