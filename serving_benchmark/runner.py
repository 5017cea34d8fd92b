"""Send a workload through the gateway with streaming completions and time every request."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Callable

import httpx

from serving_benchmark.workload import Request


@dataclass
class Result:
    index: int
    prompt_tokens: int
    output_tokens: int
    status: int
    ttft: float | None
    e2e: float | None
    tpot: float | None
    endpoint: str
    error: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


async def _one(client: httpx.AsyncClient, url: str, model: str, r: Request, start: float) -> Result:
    delay = start + r.at - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    body = {"model": model, "max_tokens": r.output_tokens, "stream": True, "ignore_eos": True}
    if r.messages is not None:
        body["messages"], path = list(r.messages), "/v1/chat/completions"
    else:
        body["prompt"], path = r.prompt, "/v1/completions"
    t0 = time.perf_counter()
    ttft = None
    try:
        async with client.stream("POST", f"{url}{path}", json=body) as resp:
            endpoint = resp.headers.get("x-gateway-destination-endpoint-served", "")
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")[:200]
                return Result(r.index, r.prompt_tokens, r.output_tokens, resp.status_code, None, None, None, endpoint, text)
            async for line in resp.aiter_lines():
                if ttft is None and line.startswith("data: ") and line != "data: [DONE]":
                    ttft = time.perf_counter() - t0
        e2e = time.perf_counter() - t0
        tpot = (e2e - ttft) / (r.output_tokens - 1) if ttft is not None and r.output_tokens > 1 else None
        return Result(r.index, r.prompt_tokens, r.output_tokens, 200, ttft, e2e, tpot, endpoint)
    except httpx.HTTPError as e:
        return Result(r.index, r.prompt_tokens, r.output_tokens, 0, None, None, None, "", f"{type(e).__name__}: {e}")


async def run_workload(url: str, model: str, workload: list[Request], progress: Callable[[], None] = lambda: None,
                       timeout: float = 600.0) -> tuple[list[Result], float]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter() + 0.05

        async def tracked(r: Request) -> Result:
            res = await _one(client, url, model, r, start)
            progress()
            return res

        results = await asyncio.gather(*(tracked(r) for r in workload))
        return list(results), time.perf_counter() - start
