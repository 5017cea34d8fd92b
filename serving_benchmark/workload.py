"""Requests and their arrival times: synthetic ShareGPT-like lengths or a ShareGPT JSON file.

Everything is drawn from one seeded generator, so two runs with the same flags send the same
prompts at the same offsets — the basis for comparing profiles.
"""

from __future__ import annotations

import json
import math
import random
import string
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Request:
    index: int
    prompt: str
    prompt_tokens: int
    output_tokens: int
    at: float  # seconds after the start
    messages: tuple[dict[str, str], ...] | None = None  # a chat (sent to /v1/chat/completions) instead of `prompt`


def _text(rng: random.Random, tokens: int) -> str:
    # 3 letters and a space ≈ 4 characters ≈ one token, as the EPP and the simulator estimate
    return " ".join("".join(rng.choices(string.ascii_lowercase, k=3)) for _ in range(tokens))


def synthetic_lengths(rng: random.Random, count: int, max_request_len: int, max_output: int) -> list[tuple[int, int]]:
    """Lognormal prompt and output lengths shaped like ShareGPT (median prompt ≈ 300 tokens, long tail)."""
    out = []
    for _ in range(count):
        p = int(min(max_request_len - 1, max(16, rng.lognormvariate(math.log(300), 0.9))))
        o = int(min(max_output, max(4, rng.lognormvariate(math.log(max_output / 2), 0.6))))
        out.append((p, min(o, max_request_len - p)))
    return out


def sharegpt_lengths(path: str, rng: random.Random, count: int, max_request_len: int, max_output: int) -> list[tuple[str, int, int]]:
    data = json.loads(Path(path).read_text())
    pairs = []
    for item in data:
        conv = item.get("conversations") or []
        if len(conv) >= 2 and isinstance(conv[0].get("value"), str) and isinstance(conv[1].get("value"), str):
            p, o = conv[0]["value"], conv[1]["value"]
            pt, ot = max(1, len(p) // 4), max(4, min(max_output, len(o) // 4))
            if pt + ot <= max_request_len:
                pairs.append((p, pt, ot))
    if not pairs:
        raise ValueError(f"{path}: no usable conversations (need conversations[0..1].value under --max_request_len)")
    return [rng.choice(pairs) for _ in range(count)]


def arrivals(rng: random.Random, count: int, qps: float, distribution: str) -> list[float]:
    if distribution == "burst" or qps <= 0:
        return [0.0] * count
    if distribution == "uniform":
        return [i / qps for i in range(count)]
    if distribution == "poisson":
        t, out = 0.0, []
        for _ in range(count):
            out.append(t)
            t += rng.expovariate(qps)
        return out
    raise ValueError(f"unknown --distribution {distribution!r}; use burst, poisson or uniform")


def build_workload(count: int, qps: float, distribution: str, max_request_len: int, max_output: int, seed: int,
                   dataset: str | None = None) -> list[Request]:
    rng = random.Random(seed)
    times = arrivals(random.Random(seed + 1), count, qps, distribution)
    if dataset:
        items = sharegpt_lengths(dataset, rng, count, max_request_len, max_output)
        return [Request(i, p, pt, ot, times[i]) for i, (p, pt, ot) in enumerate(items)]
    lengths = synthetic_lengths(rng, count, max_request_len, max_output)
    return [Request(i, _text(rng, pt), pt, ot, times[i]) for i, (pt, ot) in enumerate(lengths)]


def build_shared_prefix_workload(count: int, qps: float, distribution: str, max_output: int, seed: int, *,
                                 system_tokens: int = 2000, turns: int = 4, user_tokens: int = 150,
                                 reply_tokens: int = 100) -> list[Request]:
    """Multi-turn chats behind one common system prompt: the workload prefix caching is for.

    ⌈count / turns⌉ conversations; arrival i is turn ⌊i / conversations⌋ of conversation
    i mod conversations, so every conversation's turns are `conversations / qps` seconds apart
    and each turn's prompt is the system prompt, the previous turns (user message and a
    `reply_tokens` assistant reply each) and a new user message. Lengths vary ±30% per message.
    """
    if turns < 1 or system_tokens < 0 or user_tokens < 1 or reply_tokens < 0:
        raise ValueError("shared-prefix workload: turns and user tokens must be ≥ 1, system and reply tokens ≥ 0")
    rng = random.Random(seed)
    times = arrivals(random.Random(seed + 1), count, qps, distribution)
    conversations = max(1, -(-count // turns))
    system = _text(rng, system_tokens)

    def vary(n: int) -> int:
        return max(1, int(n * rng.uniform(0.7, 1.3)))

    histories: list[list[dict[str, str]]] = [[{"role": "system", "content": system}] if system_tokens else [] for _ in range(conversations)]
    out = []
    for i in range(count):
        chat = histories[i % conversations]
        if chat and chat[-1]["role"] == "user":  # the previous turn's reply joins the history
            chat.append({"role": "assistant", "content": _text(rng, vary(reply_tokens))})
        chat.append({"role": "user", "content": _text(rng, vary(user_tokens))})
        tokens = sum(len(m["content"]) for m in chat) // 4
        out.append(Request(i, "", tokens, int(min(max_output, max(4, rng.lognormvariate(math.log(max_output / 2), 0.6)))), times[i],
                           tuple(dict(m) for m in chat)))
    return out
