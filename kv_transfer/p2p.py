"""`nccl` backend: point-to-point send/recv of per-layer KV tensors with torch.distributed.

Like vLLM's P2pNcclConnector, the decode instance listens on a KV address (`host:kv_port`, a
TCPStore) and a prefill instance connects to the decode address named in the request id.
Each prefill↔decode pair gets its own 2-rank process group (NCCL on GPUs, gloo on CPU), built
directly on a prefixed store, so one decode can receive from several prefills at once.

Wire format per request: a fixed header tensor (request id, layout, arrival time from the link
model) then one tensor per layer.

Links heal themselves. A link waits for its next transfer without a deadline, so idling never
breaks it (gloo poisons a group whose receive times out). Every step of a transfer that has begun,
and connecting, is bounded by the link timeout. A link whose peer went away ends on the decode
side; the prefill side drops it and reconnects once, so a restarted decode is reached again. A
transfer that breaks off fails its request at once on both sides (`KVTransferError`), never by a
decode waiting out its deadline.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import socket
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kv_transfer.errors import KVTransferError, short_reason
from kv_transfer.kv_blocks import DTYPES, KVShape
from kv_transfer.link_model import LinkModel

HEADER_LEN = 320  # int64 slots: 0 magic, 1 id length, 2 blocks, 3 layers, 4 dtype, 5 ready_at µs, 64.. id bytes
MAGIC = 0x4B5631
_DTYPE_CODES = {name: i for i, name in enumerate(DTYPES)}
DEFAULT_LINK_TIMEOUT = 10.0  # seconds: connecting, and each step of a transfer under way
_STORE_CONNECT = 2.0  # seconds TCPStore may retry a refused address (it retries until its timeout)
_IDLE = datetime.timedelta(days=365)  # how long a link waits for its next transfer: idling is not a fault
log = logging.getLogger("kv_transfer")


def _process_group(store: dist.Store, rank: int, device: str, timeout: datetime.timedelta) -> dist.ProcessGroup:
    """NCCL for GPU tensors (NVLink / PCIe / IB between the pair), gloo for CPU tensors."""
    if device.startswith("cuda"):
        return dist.ProcessGroupNCCL(store, rank, 2)
    return dist.ProcessGroupGloo(store, rank, 2, timeout)


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


@dataclass
class _Link:
    pg: dist.ProcessGroup
    store: dist.Store  # the client keeps the group's rendezvous alive
    lock: threading.Lock


class P2PSender:
    """Prefill side: one process group per decode address, sends serialised per link."""

    def __init__(self, shape: KVShape, link: LinkModel | None = None, device: str = "cpu",
                 timeout: float = DEFAULT_LINK_TIMEOUT) -> None:
        self.shape, self.link, self.device = shape, link or LinkModel(), device
        self.timeout = timeout
        self._links: dict[str, _Link] = {}
        self._connecting: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def _get(self, decode_addr: str) -> tuple[_Link, bool]:
        """The cached link to `decode_addr`, or a new one (then `True`)."""
        with self._lock:
            if decode_addr in self._links:
                return self._links[decode_addr], False
            connecting = self._connecting.setdefault(decode_addr, threading.Lock())
        with connecting:  # one connection attempt per address at a time; others to other decodes go on
            with self._lock:
                if decode_addr in self._links:
                    return self._links[decode_addr], False
            link = self._connect(decode_addr)
            with self._lock:
                self._links[decode_addr] = link
            return link, True

    def _connect(self, decode_addr: str) -> _Link:
        """A new link, or KVTransferError within the link timeout.

        A plain probe first (a refused address fails at once); then the store and the group in a
        thread this one stops waiting for: a TCPStore client whose server accepted but never answers
        (a process being killed, or stopped) blocks past its own timeout.
        """
        host, _, port = decode_addr.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=min(self.timeout, 5.0)).close()
        except (OSError, ValueError) as e:
            raise KVTransferError(f"cannot reach decode KV address {decode_addr}: {getattr(e, 'strerror', None) or e}") from None
        result: dict = {}
        done = threading.Event()

        def open_link() -> None:
            try:
                store = dist.TCPStore(host, int(port), is_master=False, wait_for_workers=False,
                                      timeout=datetime.timedelta(seconds=min(self.timeout, _STORE_CONNECT)))
                store.set_timeout(datetime.timedelta(seconds=self.timeout))  # the rendezvous may take longer than connecting
                index = store.add("peers", 1) - 1
                pg = _process_group(dist.PrefixStore(f"peer{index}/", store), 0, self.device, datetime.timedelta(seconds=self.timeout))
                result["link"] = _Link(pg, store, threading.Lock())
            except (RuntimeError, ValueError) as e:  # torch's DistError is a RuntimeError
                result["error"] = short_reason(e)
            finally:
                done.set()

        threading.Thread(target=open_link, name=f"kv-connect-{decode_addr}", daemon=True).start()
        if not done.wait(self.timeout):
            raise KVTransferError(f"decode KV address {decode_addr} accepted the connection but did not answer within {self.timeout:g}s")
        if "error" in result:
            raise KVTransferError(f"cannot open a KV link to decode {decode_addr}: {result['error']}")
        return result["link"]

    def _drop(self, decode_addr: str, link: _Link) -> None:
        with self._lock:
            if self._links.get(decode_addr) is link:
                del self._links[decode_addr]

    def send(self, decode_addr: str, request_id: str, layers: list[torch.Tensor]) -> float:
        """Blocking: push the layers to the decode at `decode_addr`; returns seconds spent.

        Raises `KVTransferError` when the decode cannot be reached or the transfer breaks off. A
        cached link that fails (its decode restarted, or dropped it) is rebuilt and tried once more.
        """
        t0 = time.perf_counter()
        blocks = layers[0].shape[1]
        nbytes = sum(t.numel() * t.element_size() for t in layers)
        header = _encode_header(request_id, blocks, self.shape, 0.0)
        while True:
            link, fresh = self._get(decode_addr)
            try:
                with link.lock:
                    header[5] = int(self.link.schedule(nbytes) * 1e6)
                    link.pg.send([header.to(self.device)], 1, 0).wait()
                    for t in layers:
                        link.pg.send([t.to(self.device).contiguous()], 1, 0).wait()
                return time.perf_counter() - t0
            except RuntimeError as e:
                self._drop(decode_addr, link)
                if fresh:
                    raise KVTransferError(f"KV transfer of request {request_id} to decode {decode_addr} failed: {short_reason(e)}") from None
                log.warning("KV link to decode %s failed (%s); reconnecting", decode_addr, short_reason(e))

    def close(self) -> None:
        with self._lock:
            self._links.clear()


class P2PReceiver:
    """Decode side: listens on `host:port`, accepts prefills, and hands layers to waiting requests."""

    def __init__(self, host: str, port: int, shape: KVShape, device: str = "cpu", ttl: float = 120.0,
                 timeout: float = DEFAULT_LINK_TIMEOUT) -> None:
        self.shape, self.device, self.ttl, self.timeout = shape, device, ttl, timeout
        self._td = datetime.timedelta(seconds=timeout)
        self.store = dist.TCPStore(host, port, is_master=True, timeout=self._td, wait_for_workers=False)
        self.address = f"{host}:{port}"
        self._ready: dict[str, Received] = {}
        self._failed: dict[str, tuple[float, KVTransferError]] = {}
        self._incoming: set[str] = set()  # header arrived, layers still coming
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._peers = 0
        self.links = 0  # links open now (one per connected prefill)
        threading.Thread(target=self._accept_loop, name="kv-accept", daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            count = self.store.add("peers", 0)
            while self._peers < count:
                index = self._peers
                self._peers += 1
                threading.Thread(target=self._link_thread, args=(index,), name=f"kv-recv-{index}", daemon=True).start()
            self._stop.wait(0.05)

    def _link_thread(self, index: int) -> None:
        with self._lock:
            self.links += 1
        try:
            self._recv_loop(index)
        except Exception as e:  # noqa: BLE001 -- a link's end is logged in one line, never a thread traceback
            log.warning("KV link %d ended: %s", index, short_reason(e))
        finally:
            with self._lock:
                self.links -= 1

    def _recv_loop(self, index: int) -> None:
        try:
            pg = _process_group(dist.PrefixStore(f"peer{index}/", self.store), 1, self.device, self._td)
        except RuntimeError as e:
            log.warning("KV link %d: the prefill did not finish connecting: %s", index, short_reason(e))
            return
        shape = self.shape
        while not self._stop.is_set():
            header = torch.zeros(HEADER_LEN, dtype=torch.int64, device=self.device)
            try:
                pg.recv([header], 0, 0).wait(_IDLE)
            except RuntimeError:
                return  # the prefill went away (ended, restarted, or dropped the link); it comes back as a new peer
            header = header.cpu()
            if int(header[0]) != MAGIC:
                log.warning("KV link %d: not a KV header; closing the link", index)
                return
            n = int(header[1])
            request_id = bytes(header[64 : 64 + n].tolist()).decode()
            blocks, num_layers = int(header[2]), int(header[3])
            dtype = list(DTYPES.values())[int(header[4])]
            with self._lock:
                self._incoming.add(request_id)
            layers: list[torch.Tensor] = []
            try:
                for _ in range(num_layers):
                    t = torch.empty(shape.layer_shape(blocks), dtype=dtype, device=self.device)
                    pg.recv([t], 0, 0).wait()  # the link timeout bounds each step once a transfer is under way
                    layers.append(t.cpu() if self.device != "cpu" else t)
            except RuntimeError as e:
                self._fail(request_id, KVTransferError(
                    f"KV transfer of request {request_id} broke off after {len(layers)} of {num_layers} layers: {short_reason(e)}"))
                return
            self._deliver(request_id, Received(layers, int(header[5]) / 1e6, time.time()))

    def _deliver(self, request_id: str, item: Received) -> None:
        with self._lock:
            self._incoming.discard(request_id)
            self._failed.pop(request_id, None)
            waiters = self._waiters.pop(request_id, [])
            if not waiters:
                self._ready[request_id] = item
                self._expire()
        for loop, fut in waiters:
            _resolve(loop, fut, lambda f: f.set_result(item))

    def _fail(self, request_id: str, error: KVTransferError) -> None:
        with self._lock:
            self._incoming.discard(request_id)
            waiters = self._waiters.pop(request_id, [])
            if not waiters:  # the decode request has not come yet: it fails at once when it does
                self._failed[request_id] = (time.time(), error)
                self._expire()
        for loop, fut in waiters:
            _resolve(loop, fut, lambda f: f.set_exception(error))

    def _expire(self) -> None:
        cutoff = time.time() - self.ttl
        for rid in [r for r, v in self._ready.items() if v.arrived_at < cutoff]:
            del self._ready[rid]
        for rid in [r for r, (at, _) in self._failed.items() if at < cutoff]:
            del self._failed[rid]

    async def wait_for(self, request_id: str, timeout: float) -> Received:
        """The layers of `request_id`, no earlier than the link model lets them arrive.

        `timeout` bounds the wait for the transfer to begin; once begun, the link timeout bounds each
        step. A transfer that broke off raises its `KVTransferError` at once.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            item = self._ready.pop(request_id, None)
            failed = self._failed.pop(request_id, None)
            if item is None and failed is None:
                fut = loop.create_future()
                self._waiters.setdefault(request_id, []).append((loop, fut))
        if failed is not None:
            raise failed[1]
        if item is None:
            try:
                item = await self._await_transfer(request_id, fut, timeout)
            finally:
                with self._lock:
                    left = [w for w in self._waiters.get(request_id, []) if w[1] is not fut]
                    if left:
                        self._waiters[request_id] = left
                    else:
                        self._waiters.pop(request_id, None)
                if not fut.done():
                    fut.cancel()  # a late result or error then lands nowhere, and nothing logs it
        delay = item.ready_at - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        return item

    async def _await_transfer(self, request_id: str, fut: asyncio.Future, timeout: float) -> Received:
        wait = timeout
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(fut), wait)
            except asyncio.TimeoutError:
                with self._lock:
                    started = request_id in self._incoming
                if not started:
                    raise TimeoutError(f"KV cache of request {request_id} did not start arriving within {timeout:g}s "
                                       "(its prefill's transfer failed, or went to another decode)") from None
                wait = self.timeout  # under way: a stalled step fails the link and this request with it

    def pending(self) -> int:
        return len(self._ready)

    def close(self) -> None:
        self._stop.set()


def _resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, how) -> None:
    """Complete a waiter from a link thread; a waiter that gave up, or a loop that closed, is skipped."""
    try:
        loop.call_soon_threadsafe(lambda: fut.done() or how(fut))
    except RuntimeError:
        pass
