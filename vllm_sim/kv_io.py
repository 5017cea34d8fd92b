"""Wiring a simulator instance to a KV-transfer backend, by role, as vLLM's connectors behave.

* `nccl` (P2pNcclConnector, vLLM before its removal): the prefill pushes the request's KV to the
  decode address named in the request id; the decode waits for it.
* `fs` (ExampleConnector, shared storage): the prefill stores the whole blocks before the prompt's
  last token in a folder named by a hash of those tokens (the simulator's tokens: four bytes each,
  `prefix_cache.prompt_token_ids`); a decode finds the folder or computes the prompt itself — it
  never waits for one.
  The same prompt maps to the same folder, as in vLLM: it is stored once and loaded as often as
  the prompt comes back, until the decode's sweep removes it (120 s after it was written; the
  proxy's `--shared-storage-path` prunes a real one).
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
from array import array
from dataclasses import dataclass, field
from typing import Callable, Sequence

from kv_transfer import KVShape, KVTransferError, LinkModel, make_kv, verify_kv
from kv_transfer.shared_fs import request_dir

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


def prompt_key(token_ids: Sequence[int], tokens: int, model: str) -> str:
    """The shared-storage folder of a prompt's first `tokens` tokens (a hash of them, as vLLM names it)."""
    return hashlib.md5(model.encode() + b"\0" + array("I", token_ids[:tokens]).tobytes()).hexdigest()


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
    timeout: float = 5.0  # decode: seconds for a request's KV to start arriving (it is normally there before the request)
    device: str = "cpu"
    link_timeout: float = 10.0  # nccl: connecting, and each step of a transfer under way
    hold_timeout: float = 480.0  # nixl prefill: blocks nobody read are freed after this (VLLM_NIXL_ABORT_REQUEST_TIMEOUT)
    # nixl decode: the link from each prefill (its KV server's host:port) into this decode, on top of the prefill's own `link`
    peer_links: dict[str, LinkModel] = field(default_factory=dict)


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
                self.sender = P2PSender(cfg.shape, link, cfg.device, timeout=cfg.link_timeout)
            elif role == "decode":
                self.receiver = P2PReceiver(cfg.kv_host, cfg.kv_port, cfg.shape, cfg.device, timeout=cfg.link_timeout)
        elif cfg.backend == "fs":
            from kv_transfer.shared_fs import FsReceiver, FsSender

            if role == "prefill":
                self.sender = FsSender(cfg.kv_dir, cfg.shape, link)
            elif role == "decode":
                self.receiver = FsReceiver(cfg.kv_dir, cfg.shape)
        elif cfg.backend == "nixl" and role == "prefill":
            from kv_transfer.tcp_pull import PullServer

            self.server = PullServer(cfg.kv_host, cfg.kv_port, link, cfg.hold_timeout)

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
    async def send(self, request_id: str, prompt_tokens: int, token_ids: Sequence[int] = ()) -> None:
        """nccl/fs: produce this request's KV and hand it to the connector before the prefill answers (vLLM's synchronous PUT).

        Raises KVTransferError when it cannot be delivered, so the prefill answers an error at once
        and the proxy never sends a decode to wait for KV that is not coming.
        """
        shape = self.cfg.shape
        if self.sender is None:
            return
        if self.cfg.backend == "fs":
            tokens = stored_tokens(prompt_tokens, shape.block_size)
            if tokens <= 0:
                return  # shorter than a block and a token: nothing is stored
            key = prompt_key(token_ids, tokens, self.model)
            if (request_dir(self.sender.root, key) / "meta.json").exists():
                return  # stored already (the same prompt before): the connector finds it and stores nothing
            layers = await asyncio.to_thread(make_kv, key, tokens // shape.block_size, shape)
            await asyncio.to_thread(self.sender.send, key, layers)
            return
        layers = await asyncio.to_thread(make_kv, request_id, shape.blocks_for(prompt_tokens), shape)
        _, decode_addr = parse_p2p_request_id(request_id)
        await asyncio.to_thread(self.sender.send, decode_addr, request_id, layers)

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
    async def load(self, request_id: str, prompt_tokens: int, token_ids: Sequence[int], params: dict | None) -> Loaded:
        """This request's KV as the connector provides it: Loaded(0, …) when there is none to load (the decode computes).

        Raises KVLoadError (nixl: the blocks named could not be read), KVTransferError (nccl/fs: broke
        off, unreadable, wrong bytes) or TimeoutError (nccl: never began).
        """
        t0 = time.monotonic()
        shape = self.cfg.shape
        if self.cfg.backend == "nixl":
            if not (isinstance(params, dict) and params.get("do_remote_prefill")):
                return Loaded(0, 0.0)
            from kv_transfer.tcp_pull import PullError, pull

            rid = str(params.get("remote_request_id", ""))
            started = time.time()
            try:
                host, port = str(params.get("remote_host")), int(params.get("remote_port") or 0)
                item = await pull(host, port, rid, shape, self.cfg.timeout)
                await asyncio.to_thread(verify_kv, rid, item.layers, shape)
            except (PullError, ValueError, TypeError) as e:
                raise KVLoadError(str(e)) from None
            nbytes = sum(t.numel() * t.element_size() for t in item.layers)
            link = self.cfg.peer_links.get(f"{host}:{port}")
            if link is not None and link.enabled:  # this pair's fabric: the bytes are not there before it delivers them
                delay = link.schedule(nbytes, started) - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            return Loaded(prompt_tokens, time.monotonic() - t0, nbytes)
        if self.receiver is None:
            return Loaded(0, 0.0)
        key, tokens = request_id, prompt_tokens  # nccl: the request's whole prompt, pushed to this decode
        if self.cfg.backend == "fs":
            tokens = stored_tokens(prompt_tokens, shape.block_size)
            key = prompt_key(token_ids, tokens, self.model) if tokens > 0 else ""
            if not key or not (request_dir(self.receiver.root, key) / "meta.json").exists():
                return Loaded(0, 0.0)  # vLLM checks once when scheduling: nothing stored, so it computes
            item = await self.receiver.wait_for(key, self.cfg.timeout, keep=True)  # it stays for the same prompt again
        else:
            item = await self.receiver.wait_for(key, self.cfg.timeout)
        try:
            await asyncio.to_thread(verify_kv, key, item.layers, shape)
        except ValueError as e:
            raise KVTransferError(str(e)) from None
        return Loaded(tokens, time.monotonic() - t0)
