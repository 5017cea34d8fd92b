"""KV links heal and fail fast: idling past the link timeout, an unreachable decode, a transfer that breaks off.

(A decode that restarts, with the prefill's link to the old one cached, is tested with real processes
in tests/pd/test_backend_faults.py.)
"""

import asyncio
import os
import time

import pytest

from kv_transfer import KVShape, KVTransferError, make_kv, verify_kv
from kv_transfer.p2p import P2PReceiver, P2PSender, _encode_header
from kv_transfer.shared_fs import FsReceiver, FsSender, request_dir
from tests.conftest import free_port

SHAPE = KVShape(num_layers=2, num_kv_heads=2, head_dim=32, block_size=16)
LINK_TIMEOUT = 1.0  # seconds: gloo's op timeout, which an idle link once died of


async def transfer(sender: P2PSender, receiver: P2PReceiver, addr: str, rid: str, blocks: int = 2) -> None:
    await asyncio.to_thread(sender.send, addr, rid, make_kv(rid, blocks, SHAPE))
    got = await receiver.wait_for(rid, 5)
    verify_kv(rid, got.layers, SHAPE)


def test_idle_link_outlives_the_link_timeout():
    async def run():
        port = free_port()
        receiver = P2PReceiver("127.0.0.1", port, SHAPE, timeout=LINK_TIMEOUT)
        sender = P2PSender(SHAPE, timeout=LINK_TIMEOUT)
        addr = f"127.0.0.1:{port}"
        await transfer(sender, receiver, addr, "before-idle")
        await asyncio.sleep(3 * LINK_TIMEOUT)
        t0 = time.monotonic()
        await asyncio.gather(*(transfer(sender, receiver, addr, f"after-idle-{i}") for i in range(4)))
        assert time.monotonic() - t0 < 3 * LINK_TIMEOUT, "a transfer after idling waited for a timeout"
        assert receiver.links == 1, "the idle link itself carried the later transfers"
        receiver.close()

    asyncio.run(run())


def test_unreachable_decode_fails_at_once():
    sender = P2PSender(SHAPE, timeout=30.0)
    t0 = time.monotonic()
    with pytest.raises(KVTransferError, match=r"cannot reach decode KV address 127\.0\.0\.1:\d+"):
        sender.send(f"127.0.0.1:{free_port()}", "r", make_kv("r", 1, SHAPE))
    assert time.monotonic() - t0 < 2, "a refused address must not wait out the link timeout"


def test_decode_address_that_accepts_but_never_answers_fails_within_the_link_timeout():
    """A stopped or dying process's socket can accept and never answer; TCPStore alone would block forever."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # never accepts
    addr = f"127.0.0.1:{listener.getsockname()[1]}"
    sender = P2PSender(SHAPE, timeout=LINK_TIMEOUT)
    for attempt in range(2):  # the stuck attempt holds no lock: the next one fails as fast
        t0 = time.monotonic()
        with pytest.raises(KVTransferError, match=f"{addr} accepted the connection but did not answer within 1s"):
            sender.send(addr, f"r{attempt}", make_kv("r", 1, SHAPE))
        assert time.monotonic() - t0 < LINK_TIMEOUT + 1
    listener.close()


def test_transfer_that_breaks_off_fails_the_waiting_decode_at_once():
    """The header arrives, then the prefill stops: the waiting request fails within the link timeout, with the cause."""

    async def run():
        port = free_port()
        receiver = P2PReceiver("127.0.0.1", port, SHAPE, timeout=LINK_TIMEOUT)
        sender = P2PSender(SHAPE, timeout=60.0)
        link, _ = await asyncio.to_thread(sender._get, f"127.0.0.1:{port}")
        rid = "half-sent"
        layers = make_kv(rid, 2, SHAPE)
        await asyncio.to_thread(lambda: link.pg.send([_encode_header(rid, 2, SHAPE, 0.0)], 1, 0).wait())
        await asyncio.to_thread(lambda: link.pg.send([layers[0]], 1, 0).wait())  # one of two layers, then nothing
        t0 = time.monotonic()
        with pytest.raises(KVTransferError, match="broke off after 1 of 2 layers"):
            await receiver.wait_for(rid, 0.2)  # the start deadline is past, but the transfer began: the link decides
        assert time.monotonic() - t0 < LINK_TIMEOUT + 2
        receiver.close()

    asyncio.run(run())


def test_decode_without_kv_answers_promptly_with_the_cause():
    async def run():
        receiver = P2PReceiver("127.0.0.1", free_port(), SHAPE, timeout=LINK_TIMEOUT)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="did not start arriving within 0.3s"):
            await receiver.wait_for("never-sent", 0.3)
        assert time.monotonic() - t0 < 1.5
        assert not receiver._waiters, "a request that gave up leaves no waiter behind"
        receiver.close()

    asyncio.run(run())


def test_fs_write_failure_is_a_clear_error_and_orphans_are_swept(tmp_path):
    sender = FsSender(tmp_path / "kv", SHAPE)
    (tmp_path / "kv").chmod(0o500)  # read-only: the write fails
    try:
        if os.geteuid() != 0:  # root ignores the mode bits
            with pytest.raises(KVTransferError, match="cannot write the KV cache of request r1"):
                sender.send("r1", make_kv("r1", 1, SHAPE))
    finally:
        (tmp_path / "kv").chmod(0o700)
    receiver = FsReceiver(tmp_path / "kv", SHAPE, ttl=60)
    sender.send("orphan", make_kv("orphan", 1, SHAPE))  # its decode never came
    sender.send("fresh", make_kv("fresh", 1, SHAPE))
    old = time.time() - 120
    os.utime(request_dir(tmp_path / "kv", "orphan"), (old, old))
    assert receiver.sweep() == 1
    assert not request_dir(tmp_path / "kv", "orphan").exists() and request_dir(tmp_path / "kv", "fresh").exists()
    (request_dir(tmp_path / "kv", "fresh") / "layer_1.pt").write_bytes(b"not a tensor")
    with pytest.raises(KVTransferError, match="stored KV cache of request fresh is unreadable"):
        asyncio.run(receiver.wait_for("fresh", 1))
