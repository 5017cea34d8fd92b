"""`pull` backend: the decode reads a request's KV blocks from the prefill over TCP, as NIXL pulls them.

vLLM's NixlConnector keeps a finished prefill's blocks in place and names them in its reply
(`remote_host`/`remote_port`, `remote_request_id`, `remote_block_ids`); the decode reads them and
the prefill frees them once read, or after a timeout if no decode ever does. Here the prefill's
`PullServer` holds the per-layer tensors by request id and serves them once; `pull()` on the
decode side fetches them (the bytes really cross a socket) and waits for the link model's
arrival time, like the other backends.

Wire format: the decode sends one JSON line `{"request_id": …}`; the prefill answers one JSON line
(`{"ok": true, "blocks", "layers", "dtype", "ready_at"}` or `{"ok": false, "error"}`) and then, on
success, every layer's raw bytes in order.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from kv_transfer.kv_blocks import DTYPES, KVShape
from kv_transfer.link_model import LinkModel
from kv_transfer.p2p import Received

BUFFER = 1 << 20  # the stream reader pauses the socket above twice this; a small limit throttles bulk reads


class PullError(Exception):
    """The blocks could not be read: unknown or expired request, prefill gone, connection broken."""


@dataclass
class Held:
    layers: list[torch.Tensor]
    expires: float
    on_release: Callable[[], None]


class PullServer:
    """Prefill side: holds finished prefills' blocks until a decode reads them (or `ttl` passes)."""

    def __init__(self, host: str, port: int, link: LinkModel | None = None, ttl: float = 480.0) -> None:
        self.host, self.port, self.link, self.ttl = host, port, link or LinkModel(), ttl
        self._held: dict[str, Held] = {}
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=BUFFER)
        self.port = self._server.sockets[0].getsockname()[1]
        self._sweeper = asyncio.create_task(self._sweep_loop())

    async def close(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
        if self._server:
            self._server.close()
        for rid in list(self._held):
            self._release(rid)

    def hold(self, request_id: str, layers: list[torch.Tensor], on_release: Callable[[], None] = lambda: None) -> None:
        if self.ttl <= 0:
            on_release()  # nothing is kept: every read fails (how the tests make a KV load fail)
            return
        self._held[request_id] = Held(layers, time.monotonic() + self.ttl, on_release)

    def held(self) -> int:
        return len(self._held)

    def _release(self, request_id: str) -> Held | None:
        item = self._held.pop(request_id, None)
        if item is not None:
            item.on_release()
        return item

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(max(0.5, min(5.0, self.ttl)))
            now = time.monotonic()
            for rid in [r for r, h in self._held.items() if h.expires < now]:
                self._release(rid)  # vLLM: "Releasing expired KV blocks" — no decode read them

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            rid = json.loads(line).get("request_id") if line else None
            item = self._held.get(rid) if isinstance(rid, str) else None
            if item is None:
                writer.write(json.dumps({"ok": False, "error": f"no KV blocks held for request {rid!r} (never prefilled here, "
                                                              "already read, or expired)"}).encode() + b"\n")
                await writer.drain()
                return
            nbytes = sum(t.numel() * t.element_size() for t in item.layers)
            head = {"ok": True, "blocks": item.layers[0].shape[1], "layers": len(item.layers),
                    "dtype": str(item.layers[0].dtype).removeprefix("torch."), "ready_at": self.link.schedule(nbytes)}
            writer.write(json.dumps(head).encode() + b"\n")
            for t in item.layers:
                t = t.contiguous()
                writer.write(memoryview((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()).cast("B"))
                await writer.drain()
            self._release(rid)  # read once: the prefill frees the blocks
        except (asyncio.TimeoutError, ValueError, ConnectionError, AttributeError):
            pass
        finally:
            writer.close()


async def pull(host: str, port: int, request_id: str, shape: KVShape, timeout: float) -> Received:
    """Decode side: read `request_id`'s blocks from the prefill at host:port; raises PullError when it cannot."""
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=BUFFER), timeout)
    except (OSError, asyncio.TimeoutError) as e:
        raise PullError(f"cannot reach the prefill's KV server {host}:{port}: {e or type(e).__name__}") from None
    try:
        writer.write(json.dumps({"request_id": request_id}).encode() + b"\n")
        await writer.drain()
        head = json.loads(await asyncio.wait_for(reader.readline(), timeout))
        if not head.get("ok"):
            raise PullError(str(head.get("error", "refused")))
        dtype = DTYPES.get(head["dtype"])
        if dtype is None or head["layers"] != shape.num_layers:
            raise PullError(f"the prefill's KV layout ({head['layers']} layers of {head['dtype']}) is not this decode's")
        layers = []
        layer_shape = shape.layer_shape(head["blocks"])
        nbytes = math.prod(layer_shape) * torch.tensor([], dtype=dtype).element_size()
        for _ in range(head["layers"]):
            raw = await asyncio.wait_for(reader.readexactly(nbytes), max(0.1, timeout - (time.monotonic() - t0)))
            layers.append(torch.frombuffer(bytearray(raw), dtype=dtype).view(layer_shape))  # no copy: the tensor owns the buffer
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError, ValueError, KeyError) as e:
        raise PullError(f"reading the KV of request {request_id} from {host}:{port} broke off: {type(e).__name__}") from None
    finally:
        writer.close()
    item = Received(layers, float(head["ready_at"]), time.time())
    delay = item.ready_at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    return item
