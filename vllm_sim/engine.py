"""The simulated engine: vLLM's continuous batching in steps, with what real engines do that a simple model does not.

One loop runs the instance in steps, as vLLM's scheduler does. Each step serves every running
sequence that is decoding (one token each) and, within a token budget (`max_num_batched_tokens`),
chunks of prompts still being prefilled — so a prefill in the same step slows every decode in it:

    step = decode_ms_per_token × (1 + batch_slowdown × (decoding − 1)) + prefill_chunk_tokens / prefill_tokens_per_second

times the speed noise: a lognormal factor per step (`noise`) and, every `slow_every` seconds, a
slow phase of `slow_for` seconds `slow_factor` times slower (a busy neighbour on the host). At most
`max_num_seqs` sequences run; the rest wait. Each sequence holds KV blocks for its prompt and
output (`block_size` tokens per block, `num_gpu_blocks` in all); a sequence that needs a block
when none is free preempts the most recently admitted one, which loses its KV and waits to
recompute its prompt and what it generated (vLLM's recompute preemption). A request whose KV was
loaded from a prefill instance starts with its prompt computed.

With the defaults (no noise, blocks to spare, P/D roles that never mix prefills and decodes) it
is the latency model the predicted-latency scorer assumes; the rest is what that scorer does not
model, for routing tests on dynamics it does not share.

Every step waits through `EngineFaults` (`faults.py`): a hung engine stalls every sequence, and a
dead one fails them all at once, running or waiting.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field

from vllm_sim.faults import EngineDeadError, EngineFaults


@dataclass
class LatencyModel:
    prefill_tokens_per_second: float = 20000.0
    decode_ms_per_token: float = 10.0
    batch_slowdown: float = 0.05
    max_num_seqs: int = 32
    num_gpu_blocks: int = 4096
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    noise: float = 0.0  # sigma of the per-step lognormal speed factor
    slow_every: float = 0.0  # seconds between slow phases (0: none)
    slow_for: float = 0.0
    slow_factor: float = 1.0
    seed: int = 0

    def prefill_seconds(self, prompt_tokens: int) -> float:
        return prompt_tokens / self.prefill_tokens_per_second

    def token_seconds(self, running: int) -> float:
        return self.decode_ms_per_token / 1000.0 * (1.0 + self.batch_slowdown * max(0, running - 1))


@dataclass(eq=False)
class Seq:
    """One request in the engine."""

    prompt_tokens: int
    max_tokens: int
    computed: int = 0  # tokens whose KV this instance holds (prompt and output)
    generated: int = 0
    blocks: int = 0
    admitted_at: float = 0.0
    preemptions: int = 0
    recomputed_tokens: int = 0  # tokens whose KV was dropped by preemption and computed again
    tokens: asyncio.Queue = field(default_factory=asyncio.Queue)  # one item per generated token
    finished: bool = False

    @property
    def pending(self) -> int:
        """Input tokens without KV yet: the prompt (prefill), the last sampled token (decode), or all after preemption."""
        return self.prompt_tokens + self.generated - self.computed


class Engine:
    """Admission, chunked prefill, batched decode steps, KV blocks and preemption for one instance."""

    def __init__(self, model: LatencyModel) -> None:
        self.model = model
        self.rng = random.Random(model.seed)
        self.faults = EngineFaults()  # every step waits through it: death and hangs reach all sequences
        self.faults.on_death(self._fail_all)
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.used_blocks = 0
        self.preemptions = 0
        self.steps = 0
        self._wake = asyncio.Event()
        self._loop: asyncio.Task | None = None
        self._phase = self.rng.random() * model.slow_every if model.slow_every > 0 else 0.0
        self._t0 = time.monotonic()

    # -- what the server and metrics read --------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def kv_cache_usage(self) -> float:
        return min(1.0, self.used_blocks / self.model.num_gpu_blocks)

    def blocks(self, tokens: int) -> int:
        return max(1, math.ceil(tokens / self.model.block_size))

    # -- requests --------------------------------------------------------------------------------
    def submit(self, prompt_tokens: int, max_tokens: int, cached: int = 0) -> Seq:
        """Queue a request whose first `cached` prompt tokens have KV already (loaded from a prefill instance).

        Tokens then arrive through `next_token`. A wholly loaded prompt's first token takes one decode step.
        Raises EngineDeadError once the engine died.
        """
        self.faults.check()
        seq = Seq(max(1, prompt_tokens), max(1, max_tokens))
        seq.computed = max(0, min(cached, seq.prompt_tokens - 1))
        need = self.blocks(seq.prompt_tokens + seq.max_tokens)
        if need > self.model.num_gpu_blocks:
            raise ValueError(f"prompt and output need {need} KV blocks; the engine has {self.model.num_gpu_blocks}")
        self.waiting.append(seq)
        self._kick()
        return seq

    async def next_token(self, seq: Seq) -> None:
        """Until this sequence's next token is generated (raises what failed it, EngineDeadError at once after a death)."""
        self.faults.check()
        item = await seq.tokens.get()
        if isinstance(item, BaseException):
            raise item

    def release(self, seq: Seq) -> None:
        """The request is done (or gone): its blocks return to the pool."""
        seq.finished = True
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.used_blocks -= seq.blocks
        seq.blocks = 0
        self._kick()

    # -- the step loop ---------------------------------------------------------------------------
    def _kick(self) -> None:
        self._wake.set()
        if self._loop is None or self._loop.done():
            self._loop = asyncio.get_running_loop().create_task(self._run())

    def _reserve(self, seq: Seq, tokens: int) -> bool:
        need = self.blocks(tokens) - seq.blocks
        if need <= 0:
            return True
        if self.used_blocks + need > self.model.num_gpu_blocks:
            return False
        seq.blocks += need
        self.used_blocks += need
        return True

    def _preempt(self, victim: Seq) -> None:
        """vLLM's recompute preemption: the sequence drops its KV and waits, first in line, to compute it again."""
        self.running.remove(victim)
        self.used_blocks -= victim.blocks
        victim.blocks = 0
        victim.recomputed_tokens += victim.computed
        victim.computed = 0
        victim.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(victim)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.model.max_num_seqs:
            seq = self.waiting[0]
            if not self._reserve(seq, seq.computed + min(seq.pending, self.model.max_num_batched_tokens)):
                break  # no room: it waits for blocks to free up
            self.waiting.popleft()
            seq.admitted_at = time.monotonic()
            self.running.append(seq)

    def _speed_factor(self) -> float:
        m = self.model
        f = self.rng.lognormvariate(-m.noise * m.noise / 2, m.noise) if m.noise > 0 else 1.0  # mean 1
        if m.slow_every > 0 and m.slow_for > 0:
            if (time.monotonic() - self._t0 + self._phase) % m.slow_every < m.slow_for:
                f *= m.slow_factor
        return f

    async def _run(self) -> None:
        m = self.model
        while True:
            self._admit()
            if not self.running:
                self._wake.clear()
                if not self.waiting:
                    return
                await self._wake.wait()
                continue
            # vLLM's order: running sequences first come first; a decode takes one token, a prompt a chunk of what is left
            budget, work = m.max_num_batched_tokens, []
            for s in sorted(self.running, key=lambda x: x.admitted_at):
                n = min(s.pending, budget)
                if n > 0:
                    work.append((s, n))
                    budget -= n
            for s, n in work:  # room for this step's KV; the youngest sequence makes way when there is none
                while s in self.running and not self._reserve(s, s.computed + n):
                    self._preempt(max(self.running, key=lambda x: x.admitted_at))
            work = [(s, n) for s, n in work if s in self.running]
            decodes = sum(1 for s, n in work if n == 1)
            prefill_tokens = sum(n for s, n in work if n > 1)
            step = (m.token_seconds(decodes) if decodes else 0.0) + prefill_tokens / m.prefill_tokens_per_second
            try:
                await self.faults.sleep(step * self._speed_factor())  # never ends while hung
            except EngineDeadError:
                return  # _fail_all has ended every sequence
            self.steps += 1
            for s, n in work:
                if not s.finished:
                    s.computed += n
                    if s.pending == 0:
                        self._emit(s)  # a step that completes a sequence's input samples its next token

    def _fail_all(self, reason: str) -> None:
        """The engine died: every sequence it has, running or waiting, fails now."""
        for s in [*self.running, *self.waiting]:
            s.finished = True
            s.tokens.put_nowait(EngineDeadError(f"engine dead: {reason}"))
        self.running.clear()
        self.waiting.clear()
        self._wake.set()

    def _emit(self, s: Seq) -> None:
        s.generated += 1
        s.tokens.put_nowait(None)
        if s.generated >= s.max_tokens:
            s.finished = True  # the server releases it; it takes no more steps
            if s in self.running:
                self.running.remove(s)
