"""approx-prefix-cache-producer: which endpoints probably hold this prompt's prefix, from this EPP's own routing.

llm-d's approximate prefix cache (v0.10). The prompt's tokens (a token producer's, or the
4-bytes-per-token estimate) are cut into blocks of `blockSizeTokens` (the endpoint's own vLLM
block size with `autoTune`, never below 64); each block's hash chains the previous one, the
first seeded with the target model and `cache_salt`, so a hash stands for the whole prefix up to
its block; the trailing partial block is hashed too. After a request is scheduled its hashes are
recorded for the endpoint it went to (and the `prefill` profile's pick in P/D), each endpoint in
an LRU as large as its KV cache (`num_gpu_blocks` with autoTune, else `lruCapacityPerServer`).
The match of an endpoint is the number of leading hashes it was recorded with, walking until
a hash no endpoint has.

It never learns what an engine evicted — that is the precise producer's job — so the index is an
estimate; memory is bounded by the per-endpoint capacity, and an endpoint's entries go with it.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import xxhash

from epp.datastore.endpoint import Endpoint
from epp.scheduling.attributes import PREFIX_MATCH_KEY, PrefixCacheMatchInfo, put
from epp.scheduling.framework import CycleState, LLMRequest, SchedulingResult
from epp.scheduling.params import Params
from epp.scheduling.registry import PluginContext, register
from epp.scheduling.tokens import BYTES_PER_TOKEN, tokenized_prompt

TYPE = "approx-prefix-cache-producer"
PREFILL_PROFILE = "prefill"  # llm-d records the prefill pick too, by this profile name
MIN_BLOCK_SIZE_TOKENS = 64  # llm-d#1158: smaller blocks make the index balloon
DEFAULT_BLOCK_SIZE_TOKENS = 16
DEFAULT_MAX_PREFIX_BLOCKS = 2048
DEFAULT_MAX_PREFIX_TOKENS = 131072
DEFAULT_LRU_CAPACITY = 31250
PARAMETERS = ("autoTune", "blockSizeTokens", "blockSize", "maxPrefixBlocksToMatch", "maxPrefixTokensToMatch", "lruCapacityPerServer")
_PAIR = struct.Struct("<QQ")


def block_hashes(tokens: bytes, model: str, cache_salt: str, block_size: int, max_blocks: int) -> list[int]:
    """Chained xxh64 block hashes of a prompt's token bytes (4 bytes per token), partial tail included."""
    prev = xxhash.xxh64_intdigest((model + cache_salt).encode())
    step = block_size * BYTES_PER_TOKEN
    out: list[int] = []
    for start in range(0, len(tokens), step):
        if len(out) >= max_blocks:
            break
        prev = xxhash.xxh64_intdigest(_PAIR.pack(xxhash.xxh64_intdigest(tokens[start:start + step]), prev))
        out.append(prev)
    return out


class PrefixIndex:
    """hash → endpoints recorded with it; per endpoint an LRU of its hashes (evicting drops the reverse entry)."""

    def __init__(self) -> None:
        self.servers: dict[str, OrderedDict[int, None]] = {}
        self.capacity: dict[str, int] = {}
        self.by_hash: dict[int, set[str]] = {}

    def add(self, hashes: Sequence[int], server: str, capacity: int) -> None:
        lru = self.servers.get(server)
        if lru is None:
            lru = self.servers[server] = OrderedDict()
            self.capacity[server] = max(1, capacity)  # fixed when the endpoint is first seen, as llm-d does
        cap = self.capacity[server]
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
                continue
            lru[h] = None
            self.by_hash.setdefault(h, set()).add(server)
            if len(lru) > cap:
                old, _ = lru.popitem(last=False)
                self._unlink(old, server)

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Endpoint → leading hashes found, walking until a hash that no endpoint holds."""
        out: dict[str, int] = {}
        for h in hashes:
            servers = self.by_hash.get(h)
            if not servers:
                break
            for s in servers:
                out[s] = out.get(s, 0) + 1
        return out

    def remove(self, server: str) -> None:
        for h in self.servers.pop(server, ()):
            self._unlink(h, server)
        self.capacity.pop(server, None)

    def blocks(self) -> dict[str, int]:
        return {s: len(lru) for s, lru in self.servers.items()}

    def _unlink(self, h: int, server: str) -> None:
        owners = self.by_hash.get(h)
        if owners is not None:
            owners.discard(server)
            if not owners:
                del self.by_hash[h]


class ApproxPrefixCacheProducer:
    type_name = TYPE
    produce_order = 10

    def __init__(self, name: str, *, auto_tune: bool = True, block_size_tokens: int = DEFAULT_BLOCK_SIZE_TOKENS,
                 max_prefix_blocks: int = DEFAULT_MAX_PREFIX_BLOCKS, max_prefix_tokens: int = DEFAULT_MAX_PREFIX_TOKENS,
                 lru_capacity: int = DEFAULT_LRU_CAPACITY, min_block_size: int = MIN_BLOCK_SIZE_TOKENS) -> None:
        self.name = name
        self.auto_tune = auto_tune
        self.needs_metrics = auto_tune  # block size and capacity come from vllm:cache_config_info
        self.block_size_tokens = block_size_tokens
        self.max_prefix_blocks = max_prefix_blocks
        self.max_prefix_tokens = max_prefix_tokens
        self.lru_capacity = lru_capacity
        self.min_block_size = min_block_size
        self.index = PrefixIndex()
        self.hashes_key = f"{name}/hashes"

    def block_size(self, endpoints: Sequence[Endpoint]) -> int:
        size = self.block_size_tokens
        if self.auto_tune and endpoints and (measured := endpoints[0].metrics.block_size):
            size = measured
        return max(size, self.min_block_size)

    def max_blocks(self, block_size: int) -> int:
        if self.max_prefix_tokens > 0:
            return self.max_prefix_tokens // block_size
        return self.max_prefix_blocks if self.max_prefix_blocks > 0 else 1 << 62

    def produce(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> None:
        prompt = tokenized_prompt(state, request)
        size = self.block_size(endpoints)
        cap = self.max_blocks(size)
        per_prompt = [block_hashes(p.tobytes(), request.target_model, prompt.cache_salt, size, cap) for p in prompt.prompts]
        matched: dict[str, int] = {}
        total = 0
        for hashes in per_prompt:
            for server, n in self.index.match(hashes).items():
                matched[server] = matched.get(server, 0) + n
            total += len(hashes)
        put(state, PREFIX_MATCH_KEY, self.name, {e.key: PrefixCacheMatchInfo(matched.get(e.key, 0), total, size) for e in endpoints})
        state.write(self.hashes_key, per_prompt)
        if total:
            note: dict[str, Any] = {"block_size_tokens": size, "total_blocks": total}
            if hits := {k: n for k, n in matched.items() if n}:
                note["match_blocks"] = hits
            state.notes[self.name] = note

    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        per_prompt = result.state.read(self.hashes_key) if result.state is not None else None
        if not per_prompt or not result.targets:
            return
        chosen = [result.targets[0]]
        prefill = result.profile_results.get(PREFILL_PROFILE)
        if prefill is not None and prefill.targets and prefill.targets[0] is not chosen[0]:
            chosen.append(prefill.targets[0])
        for e in chosen:
            cap = self.capacity(e)
            for hashes in per_prompt:
                self.index.add(hashes, e.key, cap)

    def capacity(self, e: Endpoint) -> int:
        if self.auto_tune and e.metrics.num_gpu_blocks:
            return e.metrics.num_gpu_blocks
        return self.lru_capacity if self.lru_capacity > 0 else DEFAULT_LRU_CAPACITY

    def forget_endpoint(self, endpoint: Endpoint) -> None:
        self.index.remove(endpoint.key)


def from_parameters(name: str, parameters: Mapping[str, Any] | None, ctx: PluginContext) -> ApproxPrefixCacheProducer:
    p = Params(name, parameters, PARAMETERS)
    block = p.int("blockSizeTokens", DEFAULT_BLOCK_SIZE_TOKENS, minimum=0)
    legacy = p.int("blockSize", 0, minimum=0)  # deprecated (characters); llm-d maps the number as it is
    if legacy and not p.has("blockSizeTokens"):
        block = legacy
    auto = p.bool("autoTune", True)
    if not auto and block <= 0:
        raise p.error("blockSizeTokens", "must be > 0 when autoTune is false")
    producer = ApproxPrefixCacheProducer(
        name,
        auto_tune=auto,
        block_size_tokens=block or DEFAULT_BLOCK_SIZE_TOKENS,
        max_prefix_blocks=p.int("maxPrefixBlocksToMatch", DEFAULT_MAX_PREFIX_BLOCKS, minimum=0),
        max_prefix_tokens=p.int("maxPrefixTokensToMatch", DEFAULT_MAX_PREFIX_TOKENS, minimum=0),
        lru_capacity=p.int("lruCapacityPerServer", DEFAULT_LRU_CAPACITY, minimum=0),
    )
    if ctx.datastore is not None:
        ctx.datastore.on_removal(producer.forget_endpoint)
    return producer


register(TYPE)(from_parameters)
