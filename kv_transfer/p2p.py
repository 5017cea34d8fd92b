"""`nccl` backend: point-to-point send/recv of per-layer KV tensors with torch.distributed.

Like vLLM's P2pNcclConnector, the decode instance listens on a KV address (`host:kv_port`, a
TCPStore) and a prefill instance connects to the decode address named in the request id.
Each prefill↔decode pair gets its own 2-rank process group (NCCL on GPUs, gloo on CPU), built
directly on a prefixed store, so one decode can receive from several prefills at once.

Wire format per request: a fixed header tensor (request id, layout, arrival time from the link
model) then one tensor per layer.
"""

from __future__ import annotations

import asyncio
import datetime
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kv_transfer.kv_blocks import DTYPES, KVShape
from kv_transfer.link_model import LinkModel

HEADER_LEN = 320  # int64 slots: 0 magic, 1 id length, 2 blocks, 3 layers, 4 dtype, 5 ready_at µs, 64.. id bytes
MAGIC = 0x4B5631
_DTYPE_CODES = {name: i for i, name in enumerate(DTYPES)}
_TIMEOUT = datetime.timedelta(seconds=60)


def _process_group(store: dist.Store, rank: int, device: str) -> dist.ProcessGroup:
    """NCCL for GPU tensors (NVLink / PCIe / IB between the pair), gloo for CPU tensors."""
    if device.startswith("cuda"):
        return dist.ProcessGroupNCCL(store, rank, 2)
    return dist.ProcessGroupGloo(store, rank, 2, _TIMEOUT)


def _encode_header(request_id: str, blocks: int, shape: KVShape, ready_at: float) -> torch.Tensor:
    raw = request_id.encode()
    if len(raw) > HEADER_LEN - 64:
        raise ValueError(f"request id longer than {HEADER_LEN - 64} bytes")
    h = torch.zeros(HEADER_LEN, dtype=torch.int64)
    h[0], h[1], h[2], h[3], h[4], h[5] = MAGIC, len(raw), blocks, shape.num_layers, _DTYPE_CODES[shape.dtype], int(ready_at * 1e6)
    h[64 : 64 + len(raw)] = torch.tensor(list(raw), dtype=torch.int64)
    return h


@dataclass
class Received:
    layers: list[torch.Tensor]
    ready_at: float
    arrived_at: float


class P2PSender:
    """Prefill side: one process group per decode address, sends serialised per link."""

    def __init__(self, shape: KVShape, link: LinkModel | None = None, device: str = "cpu") -> None:
        self.shape, self.link, self.device = shape, link or LinkModel(), device
        self._links: dict[str, tuple[dist.ProcessGroup, threading.Lock]] = {}
        self._lock = threading.Lock()

    def _connect(self, decode_addr: str) -> tuple[dist.ProcessGroup, threading.Lock]:
        with self._lock:
            if decode_addr not in self._links:
                host, port = decode_addr.rsplit(":", 1)
                store = dist.TCPStore(host, int(port), is_master=False, timeout=_TIMEOUT, wait_for_workers=False)
                index = store.add("peers", 1) - 1
                pg = _process_group(dist.PrefixStore(f"peer{index}/", store), 0, self.device)
                self._links[decode_addr] = (pg, threading.Lock())
            return self._links[decode_addr]

    def send(self, decode_addr: str, request_id: str, layers: list[torch.Tensor]) -> float:
        """Blocking: push the layers to the decode at `decode_addr`; returns seconds spent."""
        t0 = time.perf_counter()
        pg, lock = self._connect(decode_addr)
        blocks = layers[0].shape[1]
        nbytes = sum(t.numel() * t.element_size() for t in layers)
        with lock:
            ready_at = self.link.schedule(nbytes)
            pg.send([_encode_header(request_id, blocks, self.shape, ready_at).to(self.device)], 1, 0).wait()
            for t in layers:
                pg.send([t.to(self.device).contiguous()], 1, 0).wait()
        return time.perf_counter() - t0


class P2PReceiver:
    """Decode side: listens on `host:port`, accepts prefills, and hands layers to waiting requests."""

    def __init__(self, host: str, port: int, shape: KVShape, device: str = "cpu", ttl: float = 120.0) -> None:
        self.shape, self.device, self.ttl = shape, device, ttl
        self.store = dist.TCPStore(host, port, is_master=True, timeout=_TIMEOUT, wait_for_workers=False)
        self.address = f"{host}:{port}"
        self._ready: dict[str, Received] = {}
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._peers = 0
        threading.Thread(target=self._accept_loop, name="kv-accept", daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            count = self.store.add("peers", 0)
            while self._peers < count:
                index = self._peers
                self._peers += 1
                threading.Thread(target=self._recv_loop, args=(index,), name=f"kv-recv-{index}", daemon=True).start()
            self._stop.wait(0.05)

    def _recv_loop(self, index: int) -> None:
        pg = _process_group(dist.PrefixStore(f"peer{index}/", self.store), 1, self.device)
        shape = self.shape
        while not self._stop.is_set():
            header = torch.zeros(HEADER_LEN, dtype=torch.int64, device=self.device)
            try:
                pg.recv([header], 0, 0).wait()
            except RuntimeError:
                return  # the prefill went away
            header = header.cpu()
            if int(header[0]) != MAGIC:
                return
            n = int(header[1])
            request_id = bytes(header[64 : 64 + n].tolist()).decode()
            blocks, num_layers = int(header[2]), int(header[3])
            dtype = list(DTYPES.values())[int(header[4])]
            layers = []
            for _ in range(num_layers):
                t = torch.empty(shape.layer_shape(blocks), dtype=dtype, device=self.device)
                pg.recv([t], 0, 0).wait()
                layers.append(t.cpu() if self.device != "cpu" else t)
            self._deliver(request_id, Received(layers, int(header[5]) / 1e6, time.time()))

    def _deliver(self, request_id: str, item: Received) -> None:
        with self._lock:
            waiters = self._waiters.pop(request_id, [])
            if not waiters:
                self._ready[request_id] = item
                self._expire()
        for loop, fut in waiters:
            loop.call_soon_threadsafe(lambda f=fut: f.done() or f.set_result(item))

    def _expire(self) -> None:
        cutoff = time.time() - self.ttl
        for rid in [r for r, v in self._ready.items() if v.arrived_at < cutoff]:
            del self._ready[rid]

    async def wait_for(self, request_id: str, timeout: float) -> Received:
        """The layers of `request_id`, no earlier than the link model lets them arrive."""
        loop = asyncio.get_running_loop()
        with self._lock:
            item = self._ready.pop(request_id, None)
            if item is None:
                fut = loop.create_future()
                self._waiters.setdefault(request_id, []).append((loop, fut))
        if item is None:
            try:
                item = await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                with self._lock:
                    self._waiters.pop(request_id, None)
                raise TimeoutError(f"KV cache of request {request_id} did not arrive within {timeout:g}s") from None
        delay = item.ready_at - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        return item

    def pending(self) -> int:
        return len(self._ready)

    def close(self) -> None:
        self._stop.set()
