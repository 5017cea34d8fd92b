"""Wiring a simulator instance to a KV-transfer backend, by role, as vLLM's connectors behave.

* `nccl` (P2pNcclConnector, vLLM before its removal): the prefill pushes the request's KV to the
  decode address named in the request id; the decode waits for it.
* `fs` (ExampleConnector, shared storage): the prefill stores the whole blocks before the prompt's
  last token in a folder named by a hash of those tokens (the simulator's tokens: four characters
  each); a decode finds the folder or computes the prompt itself — it never waits for one.
  The same prompt maps to the same folder, as in vLLM; the decode removes a folder it loaded
  (vLLM never does; the proxy's `--shared-storage-path` prunes a real one).
* `nixl` (NixlConnector): with `kv_transfer_params.do_remote_decode` the prefill keeps the blocks
  (holding them in its engine) and names them in its reply; a decode given those parameters pulls
  them over TCP (`kv_transfer/tcp_pull.py`). Without parameters the decode computes the prompt.

Every decode result says how many prompt tokens were loaded, so the server counts them by source
as vLLM does (`vllm:prompt_tokens_by_source_total`).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from kv_transfer import KVShape, LinkModel, make_kv, verify_kv

P2P_ID = re.compile(r"___prefill_addr_(?P<prefill>.+?)___decode_addr_(?P<decode>.+?)_(?P<uuid>[0-9a-f]{32})")


def parse_p2p_request_id(request_id: str) -> tuple[str, str]:
    """(prefill_addr, decode_addr) from `___prefill_addr_{P}___decode_addr_{D}_{uuid}`."""
    m = P2P_ID.search(request_id)
    if not m:
        raise ValueError(f"request id {request_id!r} does not carry ___prefill_addr_…___decode_addr_… as P2pNcclConnector needs")
    return m.group("prefill"), m.group("decode")


def stored_tokens(prompt_tokens: int, block_size: int) -> int:
    """ExampleConnector stores the whole blocks before the prompt's last token."""
    return (prompt_tokens - 1) // block_size * block_size


def prompt_key(prompt_text: str, tokens: int, model: str) -> str:
    """The shared-storage folder of a prompt's first `tokens` tokens (a hash of them, as vLLM names it)."""
    return hashlib.md5(f"{model}\0{prompt_text[: tokens * 4]}".encode()).hexdigest()


class KVLoadError(Exception):
    """The decode was told where the KV is but could not load it."""


@dataclass
class KVConfig:
    backend: str = "none"  # nccl | fs | nixl | none
    shape: KVShape = KVShape()
    kv_host: str = "127.0.0.1"
    kv_port: int = 0  # decode (nccl): where prefills connect; prefill (nixl): its KV server (0 = any free port)
    kv_dir: str = "/tmp/inference-epp-kv"
    link: LinkModel = None  # type: ignore[assignment]
    timeout: float = 30.0
    device: str = "cpu"
    hold_timeout: float = 480.0  # nixl prefill: blocks nobody read are freed after this (VLLM_NIXL_ABORT_REQUEST_TIMEOUT)


@dataclass
class Loaded:
    tokens: int  # prompt tokens whose KV came over the connector
    seconds: float  # how long the decode waited for it
    nbytes: int = 0


class KVSide:
    """send/hold on a prefill; load on a decode."""

    def __init__(self, role: str, cfg: KVConfig, model: str = "") -> None:
        self.role, self.cfg, self.model = role, cfg, model
        self.sender = self.receiver = self.server = None
        self.engine_id = uuid.uuid4().hex
        link = cfg.link or LinkModel()
        if cfg.backend == "nccl":
            from kv_transfer.p2p import P2PReceiver, P2PSender

            if role == "prefill":
                self.sender = P2PSender(cfg.shape, link, cfg.device)
            elif role == "decode":
                self.receiver = P2PReceiver(cfg.kv_host, cfg.kv_port, cfg.shape, cfg.device)
        elif cfg.backend == "fs":
            from kv_transfer.shared_fs import FsReceiver, FsSender

            if role == "prefill":
                self.sender = FsSender(cfg.kv_dir, cfg.shape, link)
            elif role == "decode":
                self.receiver = FsReceiver(cfg.kv_dir, cfg.shape)
        elif cfg.backend == "nixl" and role == "prefill":
            from kv_transfer.tcp_pull import PullServer

            self.server = PullServer(cfg.kv_host, cfg.kv_port, link, cfg.hold_timeout)
        self._pending: set[asyncio.Task] = set()

    async def start(self) -> None:
        if self.server is not None:
            await self.server.start()

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    @property
    def address(self) -> str:
        port = self.server.port if self.server is not None else self.cfg.kv_port
        return f"{self.cfg.kv_host}:{port}"

    # -- prefill side ----------------------------------------------------------------------------
    async def send(self, request_id: str, prompt_tokens: int, prompt_text: str = "") -> None:
        """nccl/fs: produce this request's KV and hand it to the connector (nccl pushes in the background, like PUT_ASYNC)."""
        shape = self.cfg.shape
        if self.sender is None:
            return
        if self.cfg.backend == "fs":
            tokens = stored_tokens(prompt_tokens, shape.block_size)
            if tokens <= 0:
                return  # shorter than a block and a token: nothing is stored
            key = prompt_key(prompt_text, tokens, self.model)
            layers = await asyncio.to_thread(make_kv, key, tokens // shape.block_size, shape)
            await asyncio.to_thread(self.sender.send, key, layers)
            return
        layers = await asyncio.to_thread(make_kv, request_id, shape.blocks_for(prompt_tokens), shape)
        _, decode_addr = parse_p2p_request_id(request_id)
        task = asyncio.create_task(asyncio.to_thread(self.sender.send, decode_addr, request_id, layers))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def hold(self, request_id: str, prompt_tokens: int, on_release: Callable[[], None]) -> dict:
        """nixl: keep this request's blocks for a decode to read; returns the reply's kv_transfer_params."""
        assert self.server is not None
        blocks = self.cfg.shape.blocks_for(prompt_tokens)
        remote_id = f"{request_id}-{uuid.uuid4().hex[:8]}"
        layers = await asyncio.to_thread(make_kv, remote_id, blocks, self.cfg.shape)
        self.server.hold(remote_id, layers, on_release)
        return {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [list(range(1, blocks + 1))],
                "remote_engine_id": self.engine_id, "remote_request_id": remote_id, "remote_host": self.cfg.kv_host,
                "remote_port": self.server.port, "tp_size": 1, "remote_num_tokens": prompt_tokens, "transfer_mode": "pull"}

    # -- decode side -----------------------------------------------------------------------------
    async def load(self, request_id: str, prompt_tokens: int, prompt_text: str, params: dict | None) -> Loaded:
        """This request's KV as the connector provides it: Loaded(0, …) when there is none to load (the decode computes)."""
        t0 = time.monotonic()
        shape = self.cfg.shape
        if self.cfg.backend == "nixl":
            if not (isinstance(params, dict) and params.get("do_remote_prefill")):
                return Loaded(0, 0.0)
            from kv_transfer.tcp_pull import PullError, pull

            rid = str(params.get("remote_request_id", ""))
            try:
                item = await pull(str(params.get("remote_host")), int(params.get("remote_port") or 0), rid, shape, self.cfg.timeout)
                await asyncio.to_thread(verify_kv, rid, item.layers, shape)
            except (PullError, ValueError, TypeError) as e:
                raise KVLoadError(str(e)) from None
            nbytes = sum(t.numel() * t.element_size() for t in item.layers)
            return Loaded(prompt_tokens, time.monotonic() - t0, nbytes)
        if self.cfg.backend == "fs" and self.receiver is not None:
            from kv_transfer.shared_fs import request_dir

            tokens = stored_tokens(prompt_tokens, shape.block_size)
            key = prompt_key(prompt_text, tokens, self.model) if tokens > 0 else ""
            if not key or not (request_dir(self.receiver.root, key) / "meta.json").exists():
                return Loaded(0, 0.0)  # vLLM checks once when scheduling: nothing stored, so it computes
            item = await self.receiver.wait_for(key, self.cfg.timeout)
            await asyncio.to_thread(verify_kv, key, item.layers, shape)
            return Loaded(tokens, time.monotonic() - t0)
        if self.receiver is not None:  # nccl
            item = await self.receiver.wait_for(request_id, self.cfg.timeout)
            await asyncio.to_thread(verify_kv, request_id, item.layers, shape)
            return Loaded(prompt_tokens, time.monotonic() - t0)
        return Loaded(0, 0.0)
