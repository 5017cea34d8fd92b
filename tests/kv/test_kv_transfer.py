"""KV-transfer backends on torch: bytes arrive intact, the link model shapes timing, fs cleans up."""

import asyncio
import threading
import time

import pytest
import torch

from bandwidth_profiler import SCHEMA
from bandwidth_profiler.profiler import ProfileSettings, block_counts, run_profile
from kv_transfer import KVShape, LinkModel, make_kv, verify_kv
from kv_transfer.shared_fs import FsReceiver, FsSender, request_dir
from tests.conftest import free_port

SHAPE = KVShape(num_layers=2, num_kv_heads=2, head_dim=32, block_size=16)


def test_kv_contents_are_deterministic_and_verified():
    a = make_kv("req-1", 3, SHAPE)
    assert [t.shape for t in a] == [(2, 3, 16, 2, 32)] * 2 and a[0].dtype == torch.float16
    verify_kv("req-1", make_kv("req-1", 3, SHAPE), SHAPE)
    a[1][0, 0, 0, 0, 0] += 1
    with pytest.raises(ValueError, match="layer 1"):
        verify_kv("req-1", a, SHAPE)
    with pytest.raises(ValueError):
        verify_kv("req-2", make_kv("req-1", 3, SHAPE), SHAPE)
    assert SHAPE.block_bytes == 2 * 16 * 2 * 32 * 2 * 2
    assert SHAPE.blocks_for(17) == 2


def test_link_model_is_a_fifo_link():
    link = LinkModel(bandwidth_bytes_per_s=1000.0, latency_s=0.5)
    assert link.schedule(1000, now=10.0) == pytest.approx(11.5)
    assert link.schedule(500, now=10.0) == pytest.approx(12.0)  # waits for the first transfer
    assert link.schedule(500, now=20.0) == pytest.approx(21.0)
    assert not LinkModel().enabled


def test_p2p_send_recv_between_processes_groups():
    from kv_transfer.p2p import P2PReceiver, P2PSender

    async def run():
        port = free_port()
        receiver = P2PReceiver("127.0.0.1", port, SHAPE)
        fast, slow = P2PSender(SHAPE), P2PSender(SHAPE, LinkModel(bandwidth_bytes_per_s=2e6, latency_s=0.05))
        layers = make_kv("r-fast", 8, SHAPE)
        threading.Thread(target=fast.send, args=(f"127.0.0.1:{port}", "r-fast", layers)).start()
        got = await receiver.wait_for("r-fast", 30)
        verify_kv("r-fast", got.layers, SHAPE)
        t0 = time.perf_counter()
        big = make_kv("r-slow", 64, SHAPE)  # 64 × 8 KiB = 512 KiB at 2 MB/s ≈ 0.26 s + 0.05 s
        threading.Thread(target=slow.send, args=(f"127.0.0.1:{port}", "r-slow", big)).start()
        got = await receiver.wait_for("r-slow", 30)
        assert time.perf_counter() - t0 >= 0.3
        verify_kv("r-slow", got.layers, SHAPE)
        with pytest.raises(TimeoutError):
            await receiver.wait_for("never-sent", 0.2)
        receiver.close()

    asyncio.run(run())


def test_fs_backend_round_trip_and_cleanup(tmp_path):
    async def run():
        sender, receiver = FsSender(tmp_path, SHAPE), FsReceiver(tmp_path, SHAPE)
        rid = "cmpl-___prefill_addr_a___decode_addr_b_0123456789abcdef0123456789abcdef"
        sender.send(rid, make_kv(rid, 5, SHAPE))
        assert (request_dir(tmp_path, rid) / "meta.json").exists()
        got = await receiver.wait_for(rid, 5)
        verify_kv(rid, got.layers, SHAPE)
        assert not request_dir(tmp_path, rid).exists()
        with pytest.raises(TimeoutError):
            await receiver.wait_for("missing", 0.1)

    asyncio.run(run())


def test_block_counts_are_log_spaced():
    assert block_counts(1, 1000, 4) == [1, 10, 100, 1000]
    assert block_counts(5, 5, 10) == [5]
    with pytest.raises(ValueError):
        block_counts(0, 10, 3)


@pytest.mark.parametrize("backend", ["nccl", "fs", "pull"])
def test_profile_is_monotone_and_shows_the_link(backend, tmp_path):
    link = LinkModel(bandwidth_bytes_per_s=5e6, latency_s=0.002) if backend in ("fs", "pull") else LinkModel()
    prof = run_profile(ProfileSettings(backend, SHAPE, link, 1, 64, 4, 2, 2, str(tmp_path)))
    assert prof["schema"] == SCHEMA and prof["block_bytes"] == SHAPE.block_bytes
    secs = [p["seconds"] for p in prof["points"]]
    assert [p["blocks"] for p in prof["points"]] == [1, 4, 16, 64]
    assert secs == sorted(secs)
    if backend in ("fs", "pull"):
        assert secs[-1] >= 64 * SHAPE.block_bytes / 5e6  # the capped link is visible


def test_isotonic_fit_is_monotone_and_local():
    from bandwidth_profiler.profiler import isotonic

    assert isotonic([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]
    assert isotonic([5.0, 1.0, 1.0, 9.0]) == [pytest.approx(7 / 3)] * 3 + [9.0]
    assert isotonic([1.0, 2.0]) == [1.0, 2.0]


def test_pull_reads_held_blocks_once_and_refuses_the_rest():
    from kv_transfer.tcp_pull import PullError, PullServer, pull

    async def run():
        released = []
        server = PullServer("127.0.0.1", 0, ttl=60)
        await server.start()
        layers = make_kv("r-1", 5, SHAPE)
        server.hold("r-1", layers, lambda: released.append("r-1"))
        got = await pull("127.0.0.1", server.port, "r-1", SHAPE, 10)
        verify_kv("r-1", got.layers, SHAPE)
        assert released == ["r-1"] and server.held() == 0  # read once: freed
        with pytest.raises(PullError, match="no KV blocks held"):
            await pull("127.0.0.1", server.port, "r-1", SHAPE, 10)
        with pytest.raises(PullError, match="cannot reach"):
            await pull("127.0.0.1", free_port(), "r-2", SHAPE, 2)
        await server.close()

    asyncio.run(run())
