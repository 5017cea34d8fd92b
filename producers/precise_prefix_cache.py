"""precise-prefix-cache-producer: which endpoints hold this prompt's prefix, as the engines themselves report.

llm-d's precise prefix cache (v0.10). The engines publish every block they store and evict
(vLLM `--kv-events-config`, see `producers/kv_events.py`); the index knows, per block key,
which pods hold it and in which tier. A request's token ids (a token producer's, or the
4-bytes-per-token estimate — which only matches an engine that tokenizes the same way, such as
the simulator; real vLLM needs its tokenizer) are cut into full blocks of
`tokenProcessorConfig.blockSize` (the engines' block size), keyed, and each endpoint's match is
the run of leading blocks it holds, tier-weighted (gpu 1.0, cpu 0.8). With
`speculativeIndexing`, a routed request's blocks count as held by its endpoint for
`speculativeTTL` until the engine's own events arrive.

Requests with a `cache_salt` are not matched (the engine keys their blocks with the salt; a
match without it would be a false affinity). The parameters are llm-d's; the index lives in
memory (`inMemoryConfig`), the Redis/Valkey/cost-aware backends are not implemented here.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Mapping, Sequence

from epp.datastore.endpoint import Endpoint
from epp.observability.logging import get_logger
from epp.scheduling.attributes import PREFIX_MATCH_KEY, PrefixCacheMatchInfo, put
from epp.scheduling.framework import ConfigError, CycleState, LLMRequest, SchedulingResult
from epp.scheduling.params import Params
from epp.scheduling.registry import PluginContext, register
from epp.scheduling.tokens import tokenized_prompt
from producers.kv_block_index import KVBlockIndex, TokenKeys
from producers.kv_events import EventApplier, EventsConfig, KVEventsSubscriber, parse_selector

TYPE = "precise-prefix-cache-producer"
SPECULATIVE = "speculative"
log = get_logger("epp.precise-prefix-cache")


class PrecisePrefixCacheProducer:
    type_name = TYPE
    produce_order = 10

    def __init__(self, name: str, keys: TokenKeys, index: KVBlockIndex, events: EventsConfig, *,
                 weights: Mapping[str, float] | None = None, speculative: bool = False, speculative_ttl: float = 2.0,
                 metrics_interval: float = 0.0) -> None:
        self.name = name
        self.keys = keys
        self.index = index
        self.events = events
        self.weights = dict(weights or {"gpu": 1.0, "cpu": 0.8})
        self.weights.setdefault(SPECULATIVE, 1.0)
        self.speculative = speculative
        self.speculative_ttl = speculative_ttl
        self.metrics_interval = metrics_interval
        self.applier = EventApplier(index, keys)
        self.subscriber: KVEventsSubscriber | None = None
        self._pending: deque[tuple[float, list[list[int]], str]] = deque()  # speculative entries by deadline
        self.keys_key = f"{name}/keys"
        self._next_log = 0.0

    # -- lifecycle (the EPP server starts it; building a config never opens sockets) -----------
    def start_background(self, datastore: Any) -> None:
        self.subscriber = KVEventsSubscriber(self.applier, self.events, datastore.endpoints if datastore is not None else None)
        self.subscriber.start()
        if self.events.discover_pods and datastore is not None and not self.events.zmq_endpoint:
            log.info("KV events: subscribing to every endpoint matching the selector", socket_port=self.events.socket_port,
                     selector=",".join(f"{k}{'' if op == 'exists' else op}{v}" for k, op, v in self.events.pod_selector))

    def stop_background(self) -> None:
        if self.subscriber is not None:
            self.subscriber.stop()

    # -- the cycle ------------------------------------------------------------------------------
    def produce(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> None:
        now = time.monotonic()
        self._expire(now)
        if self.metrics_interval and now >= self._next_log:
            self._next_log = now + self.metrics_interval
            log.info("KV block index", keys=len(self.index), admissions=self.index.admissions, evictions=self.index.evictions,
                     messages=self.applier.messages, malformed=self.applier.malformed, gaps=self.applier.gaps)
        prompt = tokenized_prompt(state, request)
        if prompt.cache_salt:
            return
        per_prompt = [self.keys.keys(None, p, request.target_model) for p in prompt.prompts]
        per_prompt = [k for k in per_prompt if k]
        if not per_prompt:
            return
        pods = {e.hostport for e in endpoints}
        scores: dict[str, float] = {}
        total = 0
        for keys in per_prompt:
            for pod, s in self.index.longest_prefix(keys, pods, self.weights).items():
                scores[pod] = scores.get(pod, 0.0) + s
            total += len(keys)
        bs = self.keys.block_size
        put(state, PREFIX_MATCH_KEY, self.name, {e.key: PrefixCacheMatchInfo(int(scores.get(e.hostport, 0.0)), total, bs) for e in endpoints})
        state.write(self.keys_key, per_prompt)
        note: dict[str, Any] = {"block_size_tokens": bs, "total_blocks": total}
        if hits := {e.key: int(scores[e.hostport]) for e in endpoints if scores.get(e.hostport)}:
            note["match_blocks"] = hits
        state.notes[self.name] = note

    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        if not self.speculative or result.state is None or not result.targets:
            return
        per_prompt = result.state.read(self.keys_key)
        if not per_prompt:
            return
        pod = result.targets[0].hostport
        for keys in per_prompt:
            self.index.add(None, keys, (pod, SPECULATIVE))
        self._pending.append((time.monotonic() + self.speculative_ttl, per_prompt, pod))

    def _expire(self, now: float) -> None:
        while self._pending and self._pending[0][0] <= now:
            _, per_prompt, pod = self._pending.popleft()
            for keys in per_prompt:
                self.index.evict_request_keys(keys, (pod, SPECULATIVE))

    def forget_endpoint(self, endpoint: Endpoint) -> None:
        self.index.clear(endpoint.hostport)


def _ns_duration(p: Params, field: str) -> float:
    """A Go time.Duration in JSON: nanoseconds as a number, or a duration string."""
    v = p.values.get(field)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v) / 1e9
    return p.duration(field, 0) if v else 0.0


@register(TYPE)
def from_parameters(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> PrecisePrefixCacheProducer:
    p = Params(name, parameters, ("tokenProcessorConfig", "indexerConfig", "kvEventsConfig", "speculativeIndexing", "speculativeTTL"))
    ix = p.nested("indexerConfig", ("kvBlockIndexConfig", "kvCacheBackendConfigs", "tokenProcessorConfig"))
    tp_where = "indexerConfig" if ix.has("tokenProcessorConfig") and not p.has("tokenProcessorConfig") else None  # llm-d ≤ v0.3
    tp = (ix if tp_where else p).nested("tokenProcessorConfig", ("blockSize", "blockSizeTokens", "hashSeed", "hashAlgorithm"))
    block = tp.int("blockSizeTokens", 0, minimum=0) or tp.int("blockSize", 0, minimum=0) or 16
    algorithm = tp.str("hashAlgorithm", "xxh64") or "xxh64"
    if algorithm not in ("cbor-fnv", "xxh64"):
        raise tp.error("hashAlgorithm", f"{algorithm!r} is not supported; use cbor-fnv or xxh64")
    keys = TokenKeys(block, tp.str("hashSeed"), algorithm)

    kb = ix.nested("kvBlockIndexConfig", ("inMemoryConfig", "redisConfig", "valkeyConfig", "costAwareMemoryConfig",
                                          "enableMetrics", "metricsLoggingInterval"))
    for backend in ("redisConfig", "valkeyConfig", "costAwareMemoryConfig"):
        if kb.has(backend):
            raise kb.error(backend, "is not implemented here: the index is in memory (inMemoryConfig)")
    mem = kb.nested("inMemoryConfig", ("size", "podCacheSize"))
    index = KVBlockIndex(mem.int("size", 100_000_000, minimum=1), mem.int("podCacheSize", 10, minimum=1))
    interval = _ns_duration(kb, "metricsLoggingInterval") if kb.bool("enableMetrics", False) else 0.0
    weights = {"gpu": 1.0, "cpu": 0.8}
    backends = ix.values.get("kvCacheBackendConfigs")
    if backends is not None:
        if not isinstance(backends, list) or not all(isinstance(b, Mapping) for b in backends):
            raise ix.error("kvCacheBackendConfigs", "must be a list of {name, weight}")
        weights = {}
        for i, b in enumerate(backends):
            bp = Params(name, b, ("name", "weight"), where=f"indexerConfig.kvCacheBackendConfigs[{i}].")
            weights[bp.str("name").lower()] = bp.number("weight", 1.0, lo=0.0)

    ev = p.nested("kvEventsConfig", ("zmqEndpoint", "topicFilter", "concurrency", "engineType", "discoverPods", "podDiscoveryConfig"))
    if ev.str("engineType", "vllm") not in ("", "vllm"):
        raise ev.error("engineType", "only vllm is implemented here (SGLang's event format is not)")
    ev.int("concurrency", 4, minimum=1)  # llm-d's worker count; one ordered subscriber thread here
    pd = ev.nested("podDiscoveryConfig", ("podLabelSelector", "podNamespace", "socketPort", "replaySocketPort"))
    if pd.int("replaySocketPort", 0) > 0:
        raise pd.error("replaySocketPort", "replay is not implemented here; leave it out (a gap is counted, a restart clears the pod)")
    try:
        selector = parse_selector(pd.str("podLabelSelector", "llm-d.ai/inference-serving=true") or "")
    except ValueError as e:
        raise pd.error("podLabelSelector", str(e)) from None
    events = EventsConfig(zmq_endpoint=ev.str("zmqEndpoint"), topic_filter=ev.str("topicFilter", "kv@"),
                          discover_pods=ev.bool("discoverPods", True), socket_port=pd.int("socketPort", 5557, minimum=1),
                          pod_namespace=pd.str("podNamespace"),
                          pod_selector=selector)
    if not events.zmq_endpoint and not events.discover_pods:
        raise ConfigError(f"plugin {name!r}: kvEventsConfig needs zmqEndpoint or discoverPods: true, or no event reaches the index")
    producer = PrecisePrefixCacheProducer(name, keys, index, events, weights=weights, speculative=p.bool("speculativeIndexing", False),
                                          speculative_ttl=p.duration("speculativeTTL", "2s"), metrics_interval=interval)
    if ctx.datastore is not None:
        ctx.datastore.on_removal(producer.forget_endpoint)
    return producer
