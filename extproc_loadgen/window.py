"""The measured window both load generators share: workers run through a warm-up, then a timed window."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable


async def measured_window(worker: Callable[[], Awaitable[None]], concurrency: int, warmup: float, duration: float,
                          state: dict, on_edge: Callable[[], Any]) -> tuple[float, Any, Any]:
    """Runs `concurrency` workers; `state["measuring"]` is true only inside the window, `state["stop"]` ends them.

    Returns the window's length and what `on_edge` (e.g. a CPU snapshot) returned at its start and end.
    """
    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    await asyncio.sleep(warmup)
    before = on_edge()
    state["measuring"] = True
    t_start = time.perf_counter()
    await asyncio.sleep(duration)
    state["measuring"] = False
    elapsed = time.perf_counter() - t_start
    after = on_edge()
    state["stop"] = True
    await asyncio.gather(*tasks, return_exceptions=True)
    return elapsed, before, after
