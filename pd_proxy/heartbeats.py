"""Instances registering themselves, by vLLM P2pNcclConnector's heartbeat protocol.

Each vLLM instance (TP rank 0) with `proxy_ip`/`proxy_port` in its kv_connector_extra_config sends
a msgpack dict every 3 s from a ZMQ DEALER: `{"type": "P"|"D", "http_address": "ip:port",
"zmq_address": "ip:port"}` (a `kv_both` instance registers as P). The proxy listens with a ROUTER;
an instance not heard from for `ttl` seconds is dropped. Instances given by flags are never dropped.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from pd_proxy.instances import Instance


class HeartbeatRegistry:
    def __init__(self, host: str, port: int, prefills: list[Instance], decodes: list[Instance], ttl: float = 5.0,
                 on_change: Callable[[str, str, str], None] = lambda kind, action, addr: None) -> None:
        self.host, self.port, self.ttl = host, port, ttl
        self.lists = {"P": prefills, "D": decodes}
        self.static = {id(i) for i in prefills + decodes}
        self.expires: dict[tuple[str, str], float] = {}
        self.on_change = on_change
        self._task: asyncio.Task | None = None
        self._socket = None

    async def start(self) -> None:
        import zmq
        import zmq.asyncio

        ctx = zmq.asyncio.Context.instance()
        self._socket = ctx.socket(zmq.ROUTER)
        self._socket.bind(f"tcp://{self.host}:{self.port}")
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        if self._socket is not None:
            self._socket.close(linger=0)

    async def _loop(self) -> None:
        import msgpack

        while True:
            try:
                frames = await asyncio.wait_for(self._socket.recv_multipart(), timeout=1.0)
                msg = msgpack.unpackb(frames[-1], raw=False)
                self.beat(str(msg.get("type", "")), str(msg.get("http_address", "")), str(msg.get("zmq_address", "")))
            except asyncio.TimeoutError:
                pass
            except (ValueError, TypeError, KeyError, AttributeError):
                continue  # not a heartbeat; ignore
            self.expire()

    def beat(self, kind: str, http_address: str, zmq_address: str, now: float | None = None) -> None:
        if kind not in self.lists or not http_address:
            return
        now = time.monotonic() if now is None else now
        url = http_address if http_address.startswith("http") else f"http://{http_address}"
        instances = self.lists[kind]
        found = next((i for i in instances if i.url == url), None)
        if found is None:
            instances.append(Instance(url, zmq_address))
            self.on_change(kind, "registered", url)
        elif id(found) not in self.static:
            found.kv_addr = zmq_address
        if found is None or id(found) not in self.static:
            self.expires[(kind, url)] = now + self.ttl

    def expire(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for (kind, url), deadline in list(self.expires.items()):
            if deadline < now:
                del self.expires[(kind, url)]
                self.lists[kind][:] = [i for i in self.lists[kind] if i.url != url]
                self.on_change(kind, "expired", url)
