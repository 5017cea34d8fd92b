"""Wiring a simulator instance to a KV-transfer backend, by role."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

from kv_transfer import KVShape, KVTransferError, LinkModel, make_kv, verify_kv

P2P_ID = re.compile(r"___prefill_addr_(?P<prefill>.+?)___decode_addr_(?P<decode>.+?)_(?P<uuid>[0-9a-f]{32})")


def parse_p2p_request_id(request_id: str) -> tuple[str, str]:
    """(prefill_addr, decode_addr) from `___prefill_addr_{P}___decode_addr_{D}_{uuid}`."""
    m = P2P_ID.search(request_id)
    if not m:
        raise ValueError(f"request id {request_id!r} does not carry ___prefill_addr_…___decode_addr_… as P2pNcclConnector needs")
    return m.group("prefill"), m.group("decode")


@dataclass
class KVConfig:
    backend: str = "none"  # nccl | fs | none
    shape: KVShape = KVShape()
    kv_host: str = "127.0.0.1"
    kv_port: int = 0  # decode (nccl): where prefills connect
    kv_dir: str = "/tmp/inference-epp-kv"
    link: LinkModel = None  # type: ignore[assignment]
    timeout: float = 5.0  # decode: seconds for a request's KV to start arriving (it is normally there before the request)
    device: str = "cpu"
    link_timeout: float = 10.0  # nccl: connecting, and each step of a transfer under way


class KVSide:
    """send(request_id, tokens) on a prefill; receive(request_id) on a decode."""

    def __init__(self, role: str, cfg: KVConfig) -> None:
        self.role, self.cfg = role, cfg
        self.sender = self.receiver = None
        link = cfg.link or LinkModel()
        if cfg.backend == "nccl":
            from kv_transfer.p2p import P2PReceiver, P2PSender

            if role == "prefill":
                self.sender = P2PSender(cfg.shape, link, cfg.device, timeout=cfg.link_timeout)
            elif role == "decode":
                self.receiver = P2PReceiver(cfg.kv_host, cfg.kv_port, cfg.shape, cfg.device, timeout=cfg.link_timeout)
        elif cfg.backend == "fs":
            from kv_transfer.shared_fs import FsReceiver, FsSender

            if role == "prefill":
                self.sender = FsSender(cfg.kv_dir, cfg.shape, link)
            elif role == "decode":
                self.receiver = FsReceiver(cfg.kv_dir, cfg.shape)

    @property
    def address(self) -> str:
        return f"{self.cfg.kv_host}:{self.cfg.kv_port}"

    async def send(self, request_id: str, prompt_tokens: int) -> None:
        """Produce this request's KV and push it before the prefill answers (vLLM's synchronous PUT).

        Raises KVTransferError when it cannot be delivered, so the prefill answers an error at once
        and the proxy never sends a decode to wait for KV that is not coming.
        """
        if self.sender is None:
            return
        blocks = self.cfg.shape.blocks_for(prompt_tokens)
        layers = await asyncio.to_thread(make_kv, request_id, blocks, self.cfg.shape)
        if self.cfg.backend == "nccl":
            _, decode_addr = parse_p2p_request_id(request_id)
            await asyncio.to_thread(self.sender.send, decode_addr, request_id, layers)
        else:
            await asyncio.to_thread(self.sender.send, request_id, layers)

    async def receive(self, request_id: str) -> int:
        """Wait for and verify this request's KV; returns the number of blocks received.

        Raises KVTransferError (broke off, unreadable, wrong bytes) or TimeoutError (never began).
        """
        if self.receiver is None:
            return 0
        item = await self.receiver.wait_for(request_id, self.cfg.timeout)
        try:
            await asyncio.to_thread(verify_kv, request_id, item.layers, self.cfg.shape)
        except ValueError as e:
            raise KVTransferError(str(e)) from None
        return item.layers[0].shape[1]
