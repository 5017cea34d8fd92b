"""The precise producer's index: which pods hold which KV blocks, as the engines' KV events report them.

Keys are the EPP's own block keys ("request keys", computed from token ids by `TokenKeys`);
engines name blocks by their own hashes ("engine keys"), so a `BlockStored` records engine key →
request keys, which is how a later `BlockRemoved` (engine keys only) finds what to drop. As in
llm-d's in-memory index: at most `size` request keys and as many engine keys (least recently
used go first), at most `pod_cache_size` pods per key; a pod is `ip:port` of its endpoint and a
tier is the engine's `medium` (gpu, cpu, …). Thread-safe: the event subscriber writes from its
thread while the scheduler reads.
"""

from __future__ import annotations

import struct
import sys
import threading
from array import array
from collections import OrderedDict
from typing import Iterable, Mapping, Sequence

import xxhash

Pod = tuple[str, str]  # (pod identifier ip:port, device tier)
_Q = struct.Struct("<Q")


class TokenKeys:
    """llm-d's token processor: token ids → chained block keys (full blocks only).

    `cbor-fnv` (llm-d's default): FNV-1a 64 over canonical CBOR `[parent, [tokens…], null]`, the
    chain seeded with FNV-1a(hashSeed) and then the model name; `xxh64`: xxHash64 over
    little-endian parent ‖ tokens. The keys only have to agree with themselves (lookups and
    events are both keyed here), so either works; xxh64 is much cheaper in Python.
    """

    def __init__(self, block_size: int = 16, hash_seed: str = "", algorithm: str = "cbor-fnv") -> None:
        self.block_size = block_size
        self.xxh = algorithm == "xxh64"
        self.init = xxhash.xxh64_intdigest(hash_seed.encode()) if self.xxh else _fnv(hash_seed.encode())

    def seed(self, model: str) -> int:
        if self.xxh:
            name = model.encode()
            return xxhash.xxh64_intdigest(_Q.pack(self.init) + _Q.pack(len(name)) + name)
        return _fnv(_cbor_array([self.init, None, model]))

    def keys(self, parent: int | None, tokens: Sequence[int], model: str) -> list[int]:
        bs = self.block_size
        prefix = self.seed(model) if parent is None else parent
        out = []
        if self.xxh:
            raw = tokens.tobytes() if isinstance(tokens, array) and sys.byteorder == "little" else struct.pack(f"<{len(tokens)}I", *tokens)
            step = bs * 4
            for i in range(0, len(raw) - step + 1, step):
                prefix = xxhash.xxh64_intdigest(_Q.pack(prefix) + raw[i:i + step])
                out.append(prefix)
            return out
        for i in range(0, len(tokens) - bs + 1, bs):
            prefix = _fnv(_cbor_array([prefix, list(tokens[i:i + bs]), None]))
            out.append(prefix)
        return out


def _fnv(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def _cbor_head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    for extra, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * size):
            return bytes([major << 5 | extra]) + n.to_bytes(size, "big")
    raise ValueError("integer too large for CBOR")


def _cbor_array(items: list) -> bytes:
    out = bytearray(_cbor_head(4, len(items)))
    for item in items:
        if item is None:
            out.append(0xF6)
        elif isinstance(item, int):
            out += _cbor_head(0, item)
        elif isinstance(item, str):
            raw = item.encode()
            out += _cbor_head(3, len(raw)) + raw
        else:
            out += _cbor_array(list(item))
    return bytes(out)


class KVBlockIndex:
    def __init__(self, size: int = 100_000_000, pod_cache_size: int = 10) -> None:
        self.size = max(1, size)
        self.pod_cache_size = max(1, pod_cache_size)
        self.lock = threading.Lock()
        self._data: OrderedDict[int, OrderedDict[Pod, None]] = OrderedDict()
        self._engine: OrderedDict[int, list[int]] = OrderedDict()
        self.admissions = self.evictions = 0

    def __len__(self) -> int:
        return len(self._data)

    def add(self, engine_keys: Sequence[int] | None, request_keys: Sequence[int], pod: Pod) -> None:
        with self.lock:
            if engine_keys:
                n = max(len(engine_keys), len(request_keys))  # llm-d spreads either list over the other
                for i in range(n):
                    ek, rk = engine_keys[i * len(engine_keys) // n], request_keys[i * len(request_keys) // n]
                    mapped = self._engine.get(ek)
                    if mapped is None:
                        self._engine[ek] = mapped = []
                        if len(self._engine) > self.size:
                            self._engine.popitem(last=False)
                    else:
                        self._engine.move_to_end(ek)
                    if rk not in mapped:
                        mapped.append(rk)
            for rk in request_keys:
                pods = self._data.get(rk)
                if pods is None:
                    self._data[rk] = pods = OrderedDict()
                    if len(self._data) > self.size:
                        self._data.popitem(last=False)
                else:
                    self._data.move_to_end(rk)
                pods[pod] = None
                pods.move_to_end(pod)
                if len(pods) > self.pod_cache_size:
                    pods.popitem(last=False)
                self.admissions += 1

    def request_key(self, engine_key: int) -> int | None:
        """The request key an engine block ends on (the parent of the next stored block)."""
        with self.lock:
            mapped = self._engine.get(engine_key)
            return mapped[-1] if mapped else None

    def evict_engine_key(self, engine_key: int, pod: Pod) -> None:
        with self.lock:
            mapped = self._engine.get(engine_key)
            if not mapped:
                return
            for rk in mapped:
                self._drop(rk, pod)
            if all(rk not in self._data for rk in mapped):
                del self._engine[engine_key]

    def evict_request_keys(self, request_keys: Iterable[int], pod: Pod) -> None:
        with self.lock:
            for rk in request_keys:
                self._drop(rk, pod)

    def clear(self, pod_id: str) -> None:
        """Every entry of one pod (AllBlocksCleared, a lost stream, a removed endpoint)."""
        with self.lock:
            for rk in list(self._data):
                pods = self._data[rk]
                for p in [p for p in pods if p[0] == pod_id]:
                    del pods[p]
                    self.evictions += 1
                if not pods:
                    del self._data[rk]

    def longest_prefix(self, keys: Sequence[int], pods: set[str] | None, weights: Mapping[str, float]) -> dict[str, float]:
        """Pod → Σ tier weight over the leading keys it holds without a gap (llm-d's LongestPrefix scorer)."""
        scores: dict[str, float] = {}
        active: set[str] | None = None
        with self.lock:
            for rk in keys:
                holders = self._data.get(rk)
                best: dict[str, float] = {}
                for pod_id, tier in holders or ():
                    if pods is None or pod_id in pods:
                        w = weights.get(tier, 1.0)
                        if w > best.get(pod_id, -1.0):
                            best[pod_id] = w
                active = set(best) if active is None else active & set(best)
                if not active:
                    break
                for pod_id in active:
                    scores[pod_id] = scores.get(pod_id, 0.0) + best[pod_id]
        return scores

    def _drop(self, rk: int, pod: Pod) -> None:
        pods = self._data.get(rk)
        if pods is not None and pod in pods:
            del pods[pod]
            self.evictions += 1
            if not pods:
                del self._data[rk]
