"""Streams completions through the gateway on a schedule and says how each one ended.

* answered: 200 and the stream's `data: [DONE]`;
* clear error: an error status with a body saying what went wrong, or an SSE error event;
* hung: no end within the request timeout (the client gives up);
* lost: the connection broke, a 200 stream ended without [DONE], or an error came with no body.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass
from typing import Callable

import httpx

from serving_benchmark.workload import Request

ANSWERED, CLEAR_ERROR, HUNG, LOST = "answered", "clear_error", "hung", "lost"
OUTCOMES = (ANSWERED, CLEAR_ERROR, HUNG, LOST)


@dataclass
class Sent:
    index: int
    request_id: str
    sent_at: float  # epoch seconds
    ended_at: float
    outcome: str
    status: int
    first_byte_at: float | None = None
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def _sse_error(line: str) -> str | None:
    if not line.startswith("data: ") or '"error"' not in line:
        return None
    try:
        obj = json.loads(line[6:])
    except ValueError:
        return None
    err = obj.get("error") if isinstance(obj, dict) else None
    if err is None:
        return None
    return str(err.get("message") if isinstance(err, dict) else err)[:200]


async def send_one(client: httpx.AsyncClient, url: str, model: str, r: Request, request_id: str, timeout: float) -> Sent:
    body = {"model": model, "prompt": r.prompt, "max_tokens": r.output_tokens, "stream": True, "ignore_eos": True}
    sent = Sent(r.index, request_id, time.time(), 0.0, LOST, 0, prompt_tokens=r.prompt_tokens, output_tokens=r.output_tokens)
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", f"{url}/v1/completions", json=body, headers={"x-request-id": request_id}) as resp:
                sent.status = resp.status_code
                if resp.status_code != 200:
                    text = (await resp.aread()).decode("utf-8", "replace").strip()
                    sent.outcome, sent.error = (CLEAR_ERROR if text else LOST), text[:200] or "error status without a body"
                    return sent
                done = False
                async for line in resp.aiter_lines():
                    if sent.first_byte_at is None and line.startswith("data: "):
                        sent.first_byte_at = time.time()
                    err = _sse_error(line)
                    if err is not None:
                        sent.outcome, sent.error = CLEAR_ERROR, f"stream error event: {err}"
                    if line == "data: [DONE]":
                        done = True
                if sent.error:
                    return sent
                sent.outcome = ANSWERED if done else LOST
                if not done:
                    sent.error = "200 stream ended without data: [DONE]"
                return sent
    except TimeoutError:
        sent.outcome, sent.error = HUNG, f"no end within {timeout:g}s"
        return sent
    except httpx.HTTPError as e:
        sent.outcome, sent.error = LOST, f"{type(e).__name__}: {e}"[:200]
        return sent
    finally:
        sent.ended_at = time.time()


async def run_load(url: str, model: str, workload: list[Request], run_id: str, timeout: float,
                   progress: Callable[[], None] = lambda: None, start_at: float | None = None) -> tuple[list[Sent], float]:
    """Every request at its offset from `start_at` (epoch seconds; default: now); returns the outcomes and the start."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=5.0), limits=limits) as client:
        start_epoch = time.time() + 0.05 if start_at is None else start_at
        start_perf = time.perf_counter() + (start_epoch - time.time())

        async def at_offset(r: Request) -> Sent:
            delay = start_perf + r.at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            s = await send_one(client, url, model, r, f"{run_id}-{r.index}", timeout)
            progress()
            return s

        results = await asyncio.gather(*(at_offset(r) for r in workload))
        return list(results), start_epoch
