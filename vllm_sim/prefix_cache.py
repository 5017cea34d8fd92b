"""The simulator's automatic prefix caching: vLLM's block pool, its hit rule and its eviction order.

Tokens: the simulator has no model tokenizer; it packs the UTF-8 bytes of the prompt into
4-byte little-endian tokens (a chat is its messages' roles and texts, concatenated), so equal
text gives equal tokens and a token is ≈ 4 characters, as everywhere in the simulator.

The pool holds `num_blocks` blocks of `block_size` tokens. A full prompt block is identified by
a hash chained over its parent (engine side: 64-bit BLAKE2b — not what any EPP computes). When a
request's prefill starts, the longest run of its leading full blocks found in the pool is a hit:
those tokens are not prefilled again. The rest is allocated, evicting the least recently freed
cached blocks that no running request holds (each eviction is a `BlockRemoved` event); when the
prefill ends its new full blocks become cached (`BlockStored`). Finished requests free their
blocks tail first, so a shared prefix outlives the tails behind it. When every block is held by
running requests the pool overcommits instead of preempting (the simulator does not preempt).
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

BYTES_PER_TOKEN = 4
Event = dict[str, Any]


def prompt_token_ids(body: dict) -> array:
    """The simulator's tokenizer: completions prompt (text, texts or ids) or chat messages → token ids."""
    if "messages" in body:
        data = bytearray()
        for m in body.get("messages") or ():
            if isinstance(m, dict):
                role, content = m.get("role"), m.get("content")
                data += role.encode() if isinstance(role, str) else b""
                if isinstance(content, str):
                    data += content.encode()
                elif content is not None:
                    for block in content if isinstance(content, list) else [content]:
                        text = block.get("text") if isinstance(block, dict) else block
                        data += text.encode() if isinstance(text, str) else json.dumps(block).encode()
        return _pack(bytes(data))
    p = body.get("prompt", "")
    if isinstance(p, list) and p and all(isinstance(t, int) for t in p):
        return array("I", (t & 0xFFFFFFFF for t in p))
    return _pack((p if isinstance(p, str) else "".join(map(str, p))).encode())


def _pack(data: bytes) -> array:
    if rem := len(data) % BYTES_PER_TOKEN:
        data += b"\0" * (BYTES_PER_TOKEN - rem)
    out = array("I")
    out.frombytes(data)
    return out


def _hash(parent: int | None, tokens: array) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update((parent or 0).to_bytes(8, "little"))
    h.update(tokens.tobytes())
    return int.from_bytes(h.digest(), "big")


@dataclass
class _Held:
    """What one request holds: its token ids, its full-block hashes, how many were hits, extra blocks."""

    tokens: array
    hashes: list[int]
    hit: int
    extra: int  # partial prompt block and output blocks (never cached)
    stored: bool = False


@dataclass
class BlockPool:
    num_blocks: int
    block_size: int
    publish: Callable[[list[Event]], None] | None = None
    refs: dict[int, int] = field(default_factory=dict)  # cached block hash → running requests holding it
    evictable: OrderedDict = field(default_factory=OrderedDict)  # cached, held by nobody; oldest first
    held_extra: int = 0
    queried_tokens: int = 0
    hit_tokens: int = 0
    _requests: dict[str, _Held] = field(default_factory=dict)

    @property
    def used(self) -> int:
        return len(self.refs) + self.held_extra

    def begin(self, request_id: str, tokens: array, output_tokens: int) -> int:
        """At prefill start: hold the cached prefix, allocate the rest. Returns the prompt tokens that hit."""
        bs = self.block_size
        full = len(tokens) // bs
        hashes, parent = [], None
        for i in range(full):
            parent = _hash(parent, tokens[i * bs:(i + 1) * bs])
            hashes.append(parent)
        hit = 0
        while hit < full and hashes[hit] in self.refs:
            hit += 1
        for h in hashes[:hit]:
            if self.refs[h] == 0:
                del self.evictable[h]
            self.refs[h] += 1
        extra = (1 if len(tokens) % bs else 0) + -(-output_tokens // bs)
        self._evict_for(full - hit + extra)
        self.held_extra += full - hit + extra  # the new full blocks count as extra until stored
        self._requests[request_id] = _Held(tokens, hashes, hit, extra)
        self.queried_tokens += len(tokens)
        self.hit_tokens += hit * bs
        return hit * bs

    def stored(self, request_id: str) -> None:
        """At prefill end: the request's new full blocks become cached (one BlockStored event)."""
        held = self._requests.get(request_id)
        if held is None or held.stored:
            return
        held.stored = True
        bs, new = self.block_size, held.hashes[held.hit:]
        added = []
        for h in new:
            self.held_extra -= 1
            if h in self.refs:  # another request stored the same block meanwhile: share it
                if self.refs[h] == 0:
                    del self.evictable[h]
                self.refs[h] += 1
            else:
                self.refs[h] = 1
                added.append(h)
        if added and self.publish is not None:
            first = held.hashes.index(added[0])
            self.publish([{"type": "BlockStored", "block_hashes": added,
                           "parent_block_hash": held.hashes[first - 1] if first else None,
                           "token_ids": held.tokens[first * bs:(first + len(added)) * bs].tolist(),
                           "block_size": bs, "lora_id": None, "medium": "GPU", "lora_name": None}])

    def finish(self, request_id: str) -> None:
        """The request ends: release its blocks, tail first (cached ones stay until evicted)."""
        held = self._requests.pop(request_id, None)
        if held is None:
            return
        owned = held.hashes if held.stored else held.hashes[:held.hit]
        self.held_extra -= held.extra + (0 if held.stored else len(held.hashes) - held.hit)
        for h in reversed(owned):
            n = self.refs.get(h)
            if n is None:
                continue
            if n <= 1:
                self.refs[h] = 0
                self.evictable[h] = None
            else:
                self.refs[h] = n - 1

    def reset(self) -> bool:
        """vLLM's /reset_prefix_cache: only when no request holds a block; then every block goes (AllBlocksCleared)."""
        if self._requests:
            return False
        self.refs.clear()
        self.evictable.clear()
        self.held_extra = 0
        if self.publish is not None:
            self.publish([{"type": "AllBlocksCleared"}])
        return True

    def _evict_for(self, blocks: int) -> None:
        removed = []
        while self.used + blocks > self.num_blocks and self.evictable:
            h, _ = self.evictable.popitem(last=False)
            del self.refs[h]
            removed.append(h)
        if removed and self.publish is not None:
            self.publish([{"type": "BlockRemoved", "block_hashes": removed, "medium": "GPU"}])
