"""The latency model: a batch of at most max-num-seqs sequences, a waiting queue, KV blocks.

prefill time = uncached prompt tokens / prefill_tokens_per_second (one sequence prefills at a
time, as chunked prefill of one long prompt would; those waiting for their turn count as
waiting; the prefix cache, `prefix_cache.py`, says what is cached); per-token decode time grows
with the running batch:
decode_ms_per_token × (1 + batch_slowdown × (running − 1)).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Callable

from vllm_sim.faults import EngineFaults


@dataclass
class LatencyModel:
    prefill_tokens_per_second: float = 20000.0
    decode_ms_per_token: float = 10.0
    batch_slowdown: float = 0.05
    max_num_seqs: int = 32
    num_gpu_blocks: int = 4096
    block_size: int = 16

    def prefill_seconds(self, prompt_tokens: int) -> float:
        return prompt_tokens / self.prefill_tokens_per_second

    def token_seconds(self, running: int) -> float:
        return self.decode_ms_per_token / 1000.0 * (1.0 + self.batch_slowdown * max(0, running - 1))


class Engine:
    """Admission (slots + queue), prefill serialisation and block accounting for one instance."""

    def __init__(self, model: LatencyModel) -> None:
        self.model = model
        self.faults = EngineFaults()  # every wait below goes through it: death and hangs reach all requests
        self._slots = asyncio.Semaphore(model.max_num_seqs)
        self._prefill_lock = asyncio.Lock()
        self.running = 0
        self.waiting = 0
        self.used_blocks = 0

    @property
    def kv_cache_usage(self) -> float:
        return min(1.0, self.used_blocks / self.model.num_gpu_blocks)

    def blocks(self, tokens: int) -> int:
        return max(1, math.ceil(tokens / self.model.block_size))

    async def admit(self) -> None:
        self.faults.check()
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1

    def release(self, blocks: int) -> None:
        self.running -= 1
        self.used_blocks -= blocks
        self._slots.release()

    async def prefill(self, prompt_tokens: int, cached: Callable[[], int] | None = None) -> int:
        """Prefill in turn; `cached()`, asked when the turn comes, gives the prompt tokens the prefix cache holds.

        Until its turn comes a request has not been scheduled, and vLLM reports it as waiting.
        """
        self.running -= 1
        self.waiting += 1
        try:
            await self._prefill_lock.acquire()
        finally:
            self.waiting -= 1
            self.running += 1
        try:
            hit = cached() if cached is not None else 0
            await self.faults.sleep(self.model.prefill_seconds(max(1, prompt_tokens - hit) if hit else prompt_tokens))
            return hit
        finally:
            self._prefill_lock.release()

    async def next_token(self) -> None:
        await self.faults.sleep(self.model.token_seconds(self.running))
