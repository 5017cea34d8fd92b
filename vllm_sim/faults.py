"""Engine faults as vLLM shows them: a dead engine (EngineDeadError) and a hung one.

Dead — the seed's decode-side `IndexError` in the model runner, after which vLLM's engine core is
gone: every running request ends at once with an error (a 500 with an error body; a stream already
started gets an error event and `[DONE]`, as vLLM's serving layer writes it), new requests get 500,
`/health` answers 503, and unless keep-alive is set (vLLM's VLLM_KEEP_ALIVE_ON_ENGINE_DEATH) the
server shuts down after vLLM's 5 s watchdog period. Hung — no request makes progress and `/health`
still answers 200 (vLLM's `/health` only asks whether the engine task is alive), as with a
deadlocked collective; only the client giving up ends a request.

All engine waiting goes through `sleep`, so one call to `die` or `hang` reaches every request.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, TypeVar

SEED_CRASH = "IndexError: list index out of range (gpu_model_runner, while receiving the KV cache)"
T = TypeVar("T")


class EngineDeadError(Exception):
    """The engine is gone; no request on this instance can finish."""


class EngineFaults:
    def __init__(self) -> None:
        self.dead: str | None = None
        self.hung = False
        self._pending: dict[asyncio.Future, asyncio.TimerHandle | None] = {}
        self._on_death: list[Callable[[str], None]] = []

    def on_death(self, callback: Callable[[str], None]) -> None:
        self._on_death.append(callback)

    def check(self) -> None:
        if self.dead:
            raise EngineDeadError(f"engine dead: {self.dead}")

    def sleep(self, seconds: float) -> Awaitable[None]:
        """An engine step of `seconds`: raises EngineDeadError if the engine dies, never ends while hung."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        if self.dead:
            fut.set_exception(EngineDeadError(f"engine dead: {self.dead}"))
            return fut
        handle = None if self.hung else loop.call_later(seconds, _wake, fut)
        self._pending[fut] = handle
        fut.add_done_callback(self._forget)
        return fut

    async def guard(self, aw: Awaitable[T]) -> T:
        """Await `aw` (e.g. a KV transfer) unless the engine dies first."""
        self.check()
        task = asyncio.ensure_future(aw)
        death = self._watch()
        try:
            await asyncio.wait({task, death}, return_when=asyncio.FIRST_COMPLETED)
            if death.done() and not death.cancelled() and death.exception() is not None:
                raise death.exception()  # type: ignore[misc]
            return await task
        finally:
            for f in (task, death):
                if not f.done():
                    f.cancel()

    def _watch(self) -> asyncio.Future:
        """A future that only the engine's death completes (with EngineDeadError)."""
        fut = asyncio.get_running_loop().create_future()
        self._pending[fut] = None
        fut.add_done_callback(self._forget)
        return fut

    def _forget(self, fut: asyncio.Future) -> None:
        handle = self._pending.pop(fut, None)
        if handle is not None:
            handle.cancel()

    def die(self, reason: str = SEED_CRASH) -> None:
        if self.dead:
            return
        self.dead = reason
        for fut in list(self._pending):
            if not fut.done():
                fut.set_exception(EngineDeadError(f"engine dead: {reason}"))
        for callback in self._on_death:
            callback(reason)

    def hang(self) -> None:
        self.hung = True
        for fut, handle in list(self._pending.items()):
            if handle is not None:
                handle.cancel()
                self._pending[fut] = None


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
