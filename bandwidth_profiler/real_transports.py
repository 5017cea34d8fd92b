"""Transfer times of the transports real vLLM uses here, measured the way its connectors move KV.

Runs in the vLLM venv (NIXL, safetensors and torch live there); `kv-bandwidth-profiler` starts it
for `--backends nixl,shared-storage` and prints/keeps what it measures:

    PYTHONPATH=. .venv-vllm/bin/python -m bandwidth_profiler.real_transports --backend nixl \\
        --shape '{"num_layers":2,"num_kv_heads":2,"head_dim":64,"block_size":32,"dtype":"float32"}' --counts 1,4,16

* `nixl`: two NIXL agents in two processes (a prefill holding per-layer KV caches, a decode
  reading N blocks of every layer from it with one READ, as NixlConnector's pull does); a sample is
  from creating the transfer until its state is DONE — what vLLM's `vllm:nixl_xfer_time_seconds`
  measures. The agents exchange metadata once, before the warm-up (vLLM's handshake).
* `shared-storage`: ExampleConnector's format: per layer, the N blocks' tokens gathered from the
  paged cache and saved as one safetensors file in a per-prompt folder, then loaded and scattered
  into a second cache; a sample is from the first save to the last scatter.

Prints one JSON object: {"backend", "points": [{"blocks", "samples"}]}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import uuid

DTYPES = ("float16", "bfloat16", "float32")


def _caches(shape: dict, blocks: int):
    """Per-layer paged KV caches as vLLM's CPU backend keeps them: (2, blocks, block_size, kv_heads, head_dim)."""
    import torch

    dtype = getattr(torch, shape["dtype"])
    g = torch.Generator().manual_seed(0)
    return [torch.randn((2, blocks, shape["block_size"], shape["num_kv_heads"], shape["head_dim"]), generator=g).to(dtype)
            for _ in range(shape["num_layers"])]


def _regions(caches, blocks: int) -> list[tuple[int, int, int]]:
    """(address, bytes, device) of the first `blocks` blocks of K and of V in every layer."""
    out = []
    for t in caches:
        per_block = t[0, 0].numel() * t.element_size()
        for kv in range(2):
            out.append((t[kv].data_ptr(), blocks * per_block, 0))
    return out


def _nixl_target(shape: dict, max_blocks: int, conn) -> None:
    """The prefill's agent: registers its caches, hands over its metadata and their addresses, then waits."""
    from nixl._api import nixl_agent, nixl_agent_config

    caches = _caches(shape, max_blocks)
    agent = nixl_agent("prefill-" + uuid.uuid4().hex[:8], nixl_agent_config(num_threads=1))
    agent.register_memory(caches)
    conn.send((agent.get_agent_metadata(), [t.data_ptr() for t in caches]))
    conn.recv()  # until the decode is done


def measure_nixl(shape: dict, counts: list[int], samples: int, warmup_blocks: int) -> list[dict]:
    from nixl._api import nixl_agent, nixl_agent_config

    max_blocks = max(counts + [warmup_blocks])
    parent, child = mp.get_context("spawn").Pipe()
    target = mp.get_context("spawn").Process(target=_nixl_target, args=(shape, max_blocks, child), daemon=True)
    target.start()
    try:
        meta, remote_ptrs = parent.recv()
        caches = _caches(shape, max_blocks)
        agent = nixl_agent("decode-" + uuid.uuid4().hex[:8], nixl_agent_config(num_threads=1))
        agent.register_memory(caches)
        remote = agent.add_remote_agent(meta)
        per_block = caches[0][0, 0].numel() * caches[0].element_size()
        kv_stride = max_blocks * per_block

        def one(blocks: int) -> float:
            local = agent.get_xfer_descs(_regions(caches, blocks), "DRAM")
            remote_regions = [(ptr + kv * kv_stride, blocks * per_block, 0) for ptr in remote_ptrs for kv in range(2)]
            remote_descs = agent.get_xfer_descs(remote_regions, "DRAM")
            t0 = time.perf_counter()
            handle = agent.initialize_xfer("READ", local, remote_descs, remote)
            state = agent.transfer(handle)
            while state == "PROC":
                state = agent.check_xfer_state(handle)
            elapsed = time.perf_counter() - t0
            agent.release_xfer_handle(handle)
            if state != "DONE":
                raise RuntimeError(f"NIXL READ of {blocks} blocks ended {state}")
            return elapsed

        for _ in range(5):
            one(warmup_blocks)
        return [{"blocks": n, "samples": [one(n) for _ in range(samples)]} for n in counts]
    finally:
        parent.send("done")
        target.join(10)


def measure_shared_storage(shape: dict, counts: list[int], samples: int, warmup_blocks: int, root: str) -> list[dict]:
    import safetensors.torch
    import torch

    max_blocks = max(counts + [warmup_blocks])
    src, dst = _caches(shape, max_blocks), [torch.zeros_like(t) for t in _caches(shape, max_blocks)]
    bs = shape["block_size"]

    def one(blocks: int) -> float:
        folder = os.path.join(root, uuid.uuid4().hex)  # ExampleConnector: one folder per prompt hash
        slots = torch.arange(blocks * bs)
        idx, off = slots // bs, slots % bs
        t0 = time.perf_counter()
        os.makedirs(folder, exist_ok=True)
        for i, layer in enumerate(src):  # prefill: save_kv_layer
            safetensors.torch.save_file({"kv_cache": layer[:, idx, off].contiguous()}, os.path.join(folder, f"layer.{i}.safetensors"))
        for i, layer in enumerate(dst):  # decode: start_load_kv
            kv = safetensors.torch.load_file(os.path.join(folder, f"layer.{i}.safetensors"))["kv_cache"]
            layer[:, idx, off] = kv
        elapsed = time.perf_counter() - t0
        shutil.rmtree(folder, ignore_errors=True)
        return elapsed

    for _ in range(5):
        one(warmup_blocks)
    return [{"blocks": n, "samples": [one(n) for _ in range(samples)]} for n in counts]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", required=True, choices=("nixl", "shared-storage"), help="transport to measure")
    p.add_argument("--shape", required=True, help="KV layout as JSON: num_layers, num_kv_heads, head_dim, block_size, dtype")
    p.add_argument("--counts", required=True, help="comma-separated block counts")
    p.add_argument("--samples", type=int, default=5, help="transfers per block count (default: %(default)s)")
    p.add_argument("--warmup-blocks", type=int, default=8, help="size of the warm-up transfers (default: %(default)s)")
    p.add_argument("--dir", default=None, help="shared-storage: directory (default: a temporary one)")
    args = p.parse_args(argv)
    shape = json.loads(args.shape)
    if shape.get("dtype") not in DTYPES:
        p.error(f"shape dtype must be one of {', '.join(DTYPES)}")
    counts = sorted({int(c) for c in args.counts.split(",") if c.strip()})
    if args.backend == "nixl":
        points = measure_nixl(shape, counts, args.samples, args.warmup_blocks)
    else:
        root = args.dir or tempfile.mkdtemp(prefix="kv-profile-ss-")
        os.makedirs(root, exist_ok=True)
        points = measure_shared_storage(shape, counts, args.samples, args.warmup_blocks, root)
    print(json.dumps({"backend": args.backend, "points": points}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
