"""Heartbeats to a P/D proxy, as vLLM's P2pNcclConnector sends them (ZMQ DEALER, msgpack, every 3 s)."""

from __future__ import annotations

import asyncio


async def send_heartbeats(proxy: str, role: str, http_address: str, zmq_address: str, interval: float = 3.0) -> None:
    import msgpack
    import zmq
    import zmq.asyncio

    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, zmq_address.encode())
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{proxy}")
    # a kv_both instance registers as a producer (P), as in vLLM
    payload = msgpack.packb({"type": "D" if role == "decode" else "P", "http_address": http_address, "zmq_address": zmq_address})
    try:
        while True:
            await sock.send(payload)
            await asyncio.sleep(interval)
    finally:
        sock.close()
