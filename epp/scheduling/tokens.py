"""A request's prompt as token ids, for prefix-aware producers: the token producer's, or llm-d's estimate.

Without a tokenizer, llm-d's `estimate` backend packs the UTF-8 bytes of the user input into
little-endian uint32 pseudo-tokens, 4 bytes each (the tail zero-padded): the ids mean nothing to
an engine, but equal inputs give equal ids, which is all content-locality hashing needs, and a
block of N pseudo-tokens covers N×4 bytes (≈ N real tokens). Token-id prompts pass through as
given. The result is computed once per cycle and shared through the CycleState.
"""

from __future__ import annotations

import json
from array import array
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from epp.scheduling.framework import CycleState, LLMRequest

TOKENS_KEY = "TokenizedPrompt"
BYTES_PER_TOKEN = 4


@dataclass(frozen=True, slots=True)
class TokenizedPrompt:
    prompts: tuple[array, ...]  # one array('I') of token ids per prompt (multi-prompt completions hash each alone)
    cache_salt: str = ""
    estimated: bool = True  # pseudo-tokens packed from bytes, not the engine's token ids

    def token_count(self) -> int:
        return sum(len(p) for p in self.prompts)


def tokenized_prompt(state: CycleState, request: LLMRequest) -> TokenizedPrompt:
    """The cycle's tokenized prompt: what a token producer left in `state`, else the estimate (cached)."""
    found = state.read(TOKENS_KEY)
    if found is None:
        found = estimate(request)
        state.write(TOKENS_KEY, found)
    return found


def pack(data: bytes) -> array:
    """Bytes → uint32 pseudo-tokens (little-endian, zero-padded to a multiple of 4)."""
    if rem := len(data) % BYTES_PER_TOKEN:
        data += b"\0" * (BYTES_PER_TOKEN - rem)
    out = array("I")
    out.frombytes(data)
    if out.itemsize != 4:  # pragma: no cover - every platform we run on has a 4-byte unsigned int
        raise RuntimeError("array('I') is not 32-bit on this platform")
    return out


def estimate(request: LLMRequest) -> TokenizedPrompt:
    body: Mapping[str, Any] = request.body or {}
    salt = body.get("cache_salt")
    salt = salt if isinstance(salt, str) else ""
    api = request.api
    if api == "chat/completions":
        prompts: list[array] = [pack(_chat_bytes(body))]
    elif api in ("completions", "embeddings"):
        prompts = _text_or_ids(body.get("prompt" if api == "completions" else "input"))
    elif api == "responses":
        parts = [{k: body[k]} for k in ("instructions", "tools") if body.get(k) is not None]
        parts.append({"input": body.get("input")})
        prompts = [pack(_json(parts))]
    elif api == "conversations":
        prompts = [pack(_json(body.get("items")))]
    else:
        prompts = [pack(request.prompt_text.encode())] if request.prompt_text else []
    return TokenizedPrompt(tuple(p for p in prompts if len(p)), salt)


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _text_or_ids(prompt: Any) -> list[array]:
    if isinstance(prompt, str):
        return [pack(prompt.encode())]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [_ids(prompt)]
        if all(isinstance(t, str) for t in prompt):
            return [pack(t.encode()) for t in prompt]
        if all(isinstance(t, list) for t in prompt):
            return [_ids(t) for t in prompt if all(isinstance(x, int) for x in t)]
    return []


def _ids(tokens: Sequence[int]) -> array:
    return array("I", (t & 0xFFFFFFFF for t in tokens))


def _chat_bytes(body: Mapping[str, Any]) -> bytes:
    """Tools as JSON, then each message's role and text, concatenated (llm-d's estimate of a chat)."""
    out = bytearray()
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        out += _json(tools)
    for msg in body.get("messages") or ():
        if not isinstance(msg, Mapping):
            continue
        role = msg.get("role")
        if isinstance(role, str):
            out += role.encode()
        content = msg.get("content")
        if isinstance(content, str):
            out += content.encode()
        elif isinstance(content, list):
            for block in content:
                if isinstance(block, Mapping):
                    text = block.get("text")
                    if isinstance(text, str):
                        out += text.encode()
                    else:  # an image/audio/video block: its reference stands in for its placeholder tokens
                        out += _json({k: v for k, v in block.items() if k != "type"})
    return bytes(out)
