"""Measure transfer time of N KV blocks over a backend, for log-spaced N, as the EPP will use it.

The receiver side is in this process too (a second rank for `nccl`, a reader for `fs`), so a
measurement is exactly what a decode waits for: from the start of the send until the layers are
available to it (the link model's arrival time included).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable

from bandwidth_profiler import SCHEMA
from kv_transfer import KVShape, LinkModel, make_kv


def block_counts(min_blocks: int, max_blocks: int, points: int) -> list[int]:
    """Log-spaced, de-duplicated, always including both ends."""
    if min_blocks < 1 or max_blocks < min_blocks:
        raise ValueError("need 1 <= --min-blocks <= --max-blocks")
    if points < 2 or min_blocks == max_blocks:
        return sorted({min_blocks, max_blocks})
    ratio = math.log(max_blocks / min_blocks)
    return sorted({round(min_blocks * math.exp(ratio * i / (points - 1))) for i in range(points)})


@dataclass
class ProfileSettings:
    backend: str  # nccl | fs
    shape: KVShape
    link: LinkModel
    min_blocks: int = 1
    max_blocks: int = 1024
    points: int = 10
    warmup_blocks: int = 8
    num_samples: int = 5
    fs_dir: str | None = None
    kv_backend_label: str = ""
    device: str = "cpu"  # cuda: NCCL between two ranks of this process (sender and receiver on the GPU)
    vllm_venv: str | None = None  # nixl, shared-storage: the vLLM venv whose NIXL/safetensors measure them


REAL_TRANSPORTS = ("nixl", "shared-storage")  # measured in the vLLM venv by bandwidth_profiler.real_transports
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _measure_real(settings: ProfileSettings) -> list[dict]:
    """Run real_transports in the vLLM venv; its raw samples become points here."""
    from vllm_cpu.server import VllmCpu

    engine = VllmCpu(**({"venv": settings.vllm_venv} if settings.vllm_venv else {}))
    engine.check_installed()
    s = settings.shape
    shape = {"num_layers": s.num_layers, "num_kv_heads": s.num_kv_heads, "head_dim": s.head_dim, "block_size": s.block_size, "dtype": s.dtype}
    counts = block_counts(settings.min_blocks, settings.max_blocks, settings.points)
    cmd = [str(engine.python), "-m", "bandwidth_profiler.real_transports", "--backend", settings.backend, "--shape", json.dumps(shape),
           "--counts", ",".join(map(str, counts)), "--samples", str(settings.num_samples), "--warmup-blocks", str(settings.warmup_blocks)]
    if settings.fs_dir and settings.backend == "shared-storage":
        cmd += ["--dir", settings.fs_dir]
    done = subprocess.run(cmd, cwd=REPO, env={**engine.env(), "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {settings.backend} failed:\n{done.stderr[-2000:]}")
    raw = json.loads(done.stdout.strip().splitlines()[-1])["points"]
    return [{"blocks": p["blocks"], "seconds": statistics.median(p["samples"]), "samples": p["samples"], "bytes": p["blocks"] * s.block_bytes}
            for p in raw]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _measure(settings: ProfileSettings, progress: Callable[[int], None]) -> list[dict]:
    shape = settings.shape
    if settings.backend == "nccl":
        from kv_transfer.p2p import P2PReceiver, P2PSender

        port = _free_port()
        cuda = settings.device == "cuda"  # two GPUs of this node: what NVLink connects
        receiver = P2PReceiver("127.0.0.1", port, shape, "cuda:1" if cuda else "cpu")
        sender = P2PSender(shape, settings.link, "cuda:0" if cuda else "cpu")

        def send(rid, layers):
            sender.send(f"127.0.0.1:{port}", rid, layers)
    elif settings.backend == "fs":
        from kv_transfer.shared_fs import FsReceiver, FsSender

        root = settings.fs_dir or tempfile.mkdtemp(prefix="kv-profile-")
        receiver = FsReceiver(root, shape)
        fs_sender = FsSender(root, shape, settings.link)
        send = fs_sender.send
    elif settings.backend == "pull":
        from kv_transfer.tcp_pull import PullServer, pull

        server = PullServer("127.0.0.1", 0, settings.link)
        await server.start()

        def send(rid, layers):
            server.hold(rid, layers)

        class _Receiver:  # the decode's read, which is what a pull transfer is
            @staticmethod
            async def wait_for(rid, timeout):
                return await pull("127.0.0.1", server.port, rid, shape, timeout)

        receiver = _Receiver()
    else:
        raise ValueError(f"unknown backend {settings.backend!r}; use nccl, fs, pull, nixl or shared-storage")

    async def one(rid: str, layers) -> float:
        t0 = time.perf_counter()
        if settings.backend == "pull":  # the prefill keeps the blocks where they are; the decode's read is the transfer
            send(rid, layers)
            await receiver.wait_for(rid, 120)
            return time.perf_counter() - t0
        th = threading.Thread(target=send, args=(rid, layers))
        th.start()
        await receiver.wait_for(rid, 120)
        elapsed = time.perf_counter() - t0
        await asyncio.to_thread(th.join)
        return elapsed

    warm = make_kv("warmup", settings.warmup_blocks, shape)
    for i in range(5):  # first transfers pay for connection set-up and first-touch allocation
        await one(f"warmup-{i}", warm)
    points = []
    for blocks in block_counts(settings.min_blocks, settings.max_blocks, settings.points):
        layers = make_kv(f"profile-{blocks}", blocks, shape)
        samples = [await one(f"profile-{blocks}-{i}", layers) for i in range(settings.num_samples)]
        points.append({"blocks": blocks, "seconds": statistics.median(samples), "samples": samples,
                       "bytes": blocks * shape.block_bytes})
        progress(1)
    return points


def isotonic(values: list[float]) -> list[float]:
    """Least-squares non-decreasing fit (pool adjacent violators).

    Transfer time cannot fall as the transfer grows; a noisy sample is averaged with its
    neighbours instead of lifting every later point, as a running maximum would.
    """
    blocks: list[list[float]] = []  # [mean, weight]
    for v in values:
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, w2), (m1, w1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2])
    out: list[float] = []
    for mean, weight in blocks:
        out.extend([mean] * int(weight))
    return out


def run_profile(settings: ProfileSettings, progress: Callable[[int], None] = lambda n: None) -> dict:
    if settings.backend in REAL_TRANSPORTS:
        points = _measure_real(settings)
        progress(len(points))
    else:
        points = asyncio.run(_measure(settings, progress))
    for pt, fitted in zip(points, isotonic([pt["seconds"] for pt in points])):
        pt["measured_seconds"] = pt["seconds"]
        pt["seconds"] = fitted

    s = settings.shape
    return {
        "schema": SCHEMA,
        "backend": settings.backend,
        "kv_backend": settings.kv_backend_label or ("fs" if settings.backend in ("fs", "shared-storage") else "nvlink"),
        "block_tokens": s.block_size,
        "block_bytes": s.block_bytes,
        "shape": {"num_layers": s.num_layers, "num_kv_heads": s.num_kv_heads, "head_dim": s.head_dim, "block_size": s.block_size, "dtype": s.dtype},
        "device": settings.device,
        "link": {"bandwidth_bytes_per_s": settings.link.bandwidth_bytes_per_s, "latency_s": settings.link.latency_s},
        "settings": {"min_blocks": settings.min_blocks, "max_blocks": settings.max_blocks, "points": settings.points,
                     "warmup_blocks": settings.warmup_blocks, "num_samples": settings.num_samples},
        "host": os.uname().nodename,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "points": points,
    }
