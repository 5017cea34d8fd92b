"""The precise prefix cache's input side: vLLM's KV-event wire format, block keys, and the index."""

import time

import msgpack
import pytest
import zmq

from epp.config import build, parse
from epp.datastore import Endpoint
from epp.scheduling.framework import ConfigError, CycleState, LLMRequest
from epp.scheduling.tokens import pack
from producers.kv_block_index import KVBlockIndex, TokenKeys, _cbor_array, _fnv
from producers.kv_events import EventApplier, EventsConfig, KVEventsSubscriber, parse_selector, selector_matches
from tests.conftest import free_port, wait_until

TOPIC = b"kv@10.0.0.7:8000@m"
POD = "10.0.0.7:8000"


def batch(*events, array_events=False):
    def enc(e):
        if not array_events:
            return e
        order = {"BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium"),
                 "BlockRemoved": ("block_hashes", "medium"), "AllBlocksCleared": ()}[e["type"]]
        return [e["type"], *(e.get(k) for k in order)]

    return msgpack.packb([time.time(), [enc(e) for e in events], 0])


def stored(hashes, tokens, parent=None, medium="GPU"):
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens, "block_size": 4,
            "lora_id": None, "medium": medium, "lora_name": None}


def seq(n):
    return n.to_bytes(8, "big")


@pytest.fixture
def applier():
    return EventApplier(KVBlockIndex(), TokenKeys(block_size=4))


@pytest.mark.parametrize("array_events", [False, True], ids=["map-events", "array-events"])
def test_stored_chain_removed_and_cleared(applier, array_events):
    keys = applier.keys
    tokens = list(range(12))
    applier.apply(TOPIC, seq(0), batch(stored([11, 12], tokens[:8]), array_events=array_events))
    applier.apply(TOPIC, seq(1), batch(stored([13], tokens[8:], parent=12), array_events=array_events))
    want = keys.keys(None, tokens, "m")
    assert applier.index.longest_prefix(want, None, {"gpu": 1.0}) == {POD: 3.0}, "the chained event continues the prompt's keys"
    applier.apply(TOPIC, seq(2), batch({"type": "BlockRemoved", "block_hashes": [12], "medium": "GPU"}, array_events=array_events))
    assert applier.index.longest_prefix(want, None, {}) == {POD: 1.0}, "a gap ends the prefix"
    applier.apply(TOPIC, seq(3), batch({"type": "AllBlocksCleared"}, array_events=array_events))
    assert len(applier.index) == 0 and applier.malformed == 0


def test_tiers_weights_pods_and_restarts(applier):
    tokens = list(range(8))
    applier.apply(TOPIC, seq(5), batch(stored([1, 2], tokens, medium="CPU")))
    applier.apply(b"kv@10.0.0.8:8000@m", seq(0), batch(stored([3, 4], tokens)))
    want = applier.keys.keys(None, tokens, "m")
    assert applier.index.longest_prefix(want, None, {"gpu": 1.0, "cpu": 0.8}) == {POD: pytest.approx(1.6), "10.0.0.8:8000": 2.0}
    assert applier.index.longest_prefix(want, {"10.0.0.8:8000"}, {}) == {"10.0.0.8:8000": 2.0}
    applier.apply(TOPIC, seq(0), batch())  # the sequence went back: that engine restarted with an empty cache
    assert applier.restarts == 1 and applier.index.longest_prefix(want, None, {}) == {"10.0.0.8:8000": 2.0}
    applier.apply(b"kv@10.0.0.8:8000@m", seq(7), batch())
    assert applier.gaps == 1


def test_unknown_parent_and_malformed_messages_are_dropped(applier):
    applier.apply(TOPIC, seq(0), batch(stored([5], [1, 2, 3, 4], parent=999)))
    assert len(applier.index) == 0, "a block whose parent was never seen cannot be keyed"
    for payload in (b"\xc1", msgpack.packb({"no": "events"}), batch({"type": "Bogus"}), batch(stored("x", [1]))):
        applier.apply(TOPIC, seq(1), payload)
    assert applier.malformed == 4
    applier.apply(TOPIC, seq(2), msgpack.packb({"ts": 1.0, "events": [stored([b"\x00" * 24 + b"\x00\x00\x00\x00\x00\x00\x00\x09"], [1, 2, 3, 4])]}))
    assert applier.index.request_key(9) is not None, "a map batch and a bytes hash (its last 8 bytes) are read too"


def test_token_keys_cbor_fnv_and_xxh64():
    assert _fnv(b"") == 0xCBF29CE484222325 and _fnv(b"a") == 0xAF63DC4C8601EC8C
    assert _cbor_array([1, None, "m"]) == bytes([0x83, 0x01, 0xF6, 0x61]) + b"m"
    assert _cbor_array([2**40, [1, 500], None]) == bytes([0x83, 0x1B]) + (2**40).to_bytes(8, "big") + bytes([0x82, 0x01, 0x19, 0x01, 0xF4, 0xF6])
    for algorithm in ("cbor-fnv", "xxh64"):
        k = TokenKeys(4, "seed", algorithm)
        full = k.keys(None, list(range(10)), "m")
        assert len(full) == 2, "only full blocks"
        assert k.keys(full[0], list(range(4, 8)), "m") == full[1:], "a chain continues from its parent key"
        assert k.keys(None, list(range(10)), "other") != full
    assert TokenKeys(4, "a").keys(None, [1, 2, 3, 4], "m") != TokenKeys(4, "b").keys(None, [1, 2, 3, 4], "m")


def test_index_bounds_keys_and_pods_per_key():
    ix = KVBlockIndex(size=3, pod_cache_size=2)
    ix.add([1], [10, 11], ("p1", "gpu"))
    ix.add([2], [12, 13], ("p2", "gpu"))
    assert len(ix) == 3 and ix.request_key(2) == 13
    for pod in ("p1", "p2", "p3"):
        ix.add(None, [13], (pod, "gpu"))
    assert ix.longest_prefix([13], None, {}) == {"p2": 1.0, "p3": 1.0}
    ix.clear("p3")
    assert ix.longest_prefix([13], None, {}) == {"p2": 1.0}


def test_selectors():
    sel = parse_selector("llm-d.ai/inference-serving=true,tier!=cpu,gpu")
    assert selector_matches(sel, {"llm-d.ai/inference-serving": "true", "gpu": ""})
    assert not selector_matches(sel, {"llm-d.ai/inference-serving": "true", "gpu": "", "tier": "cpu"})
    assert not selector_matches(sel, {"llm-d.ai/inference-serving": "true"})
    with pytest.raises(ValueError):
        parse_selector("a in (b)")


def test_subscriber_hears_a_real_pub_socket_and_scores_the_endpoint():
    port = free_port()
    cfg = parse(f"""
plugins:
- type: precise-prefix-cache-scorer
  parameters:
    tokenProcessorConfig: {{blockSize: 4}}
    kvEventsConfig: {{zmqEndpoint: "tcp://127.0.0.1:{port}", discoverPods: false}}
    speculativeIndexing: true
    speculativeTTL: 50ms
""", "t.yaml")
    built = build(cfg)
    producer = built.plugins["precise-prefix-cache-scorer-producer"]
    producer.start_background(None)
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.connect(f"tcp://127.0.0.1:{port}")
    try:
        a = Endpoint("a", "10.0.0.7", 8000)
        b = Endpoint("b", "10.0.0.8", 8000)
        content = "abcdefghijklmnopqrstuvwxyz012345" + "more" * 3
        tokens = pack(("user" + content).encode()).tolist()  # 12 pseudo-tokens: three blocks of 4
        n = 0

        def published():
            nonlocal n
            pub.send_multipart([TOPIC, seq(n), batch(stored([21, 22], tokens[:8]))])  # the engine holds two of them
            n += 1
            return len(producer.index) >= 2

        assert wait_until(published, timeout=10, interval=0.1), "the subscriber receives (after ZMQ's connect handshake)"
        req = LLMRequest("r", "m", "m", "chat/completions", 12, body={"messages": [{"role": "user", "content": content}]})
        result = built.scheduler.schedule(req, [a, b])
        assert result.targets[0] is a and result.primary.raw_scores["precise-prefix-cache-scorer"] == {"a": pytest.approx(2 / 3), "b": 0.0}
        assert result.notes["precise-prefix-cache-scorer-producer"]["match_blocks"] == {"a": 2}
        built.scheduler.pre_request(req, result)  # speculative: the third block counts as on a for 50 ms
        keys = producer.keys.keys(None, tokens, "m")
        assert producer.index.longest_prefix(keys, None, {}) == {POD: 3.0}
        time.sleep(0.1)
        producer.produce(CycleState(), req, [a, b])
        assert producer.index.longest_prefix(keys, None, {}) == {POD: 2.0}
    finally:
        pub.close(0)
        producer.stop_background()


@pytest.mark.parametrize("params, match", [
    ({"kvEventsConfig": {"discoverPods": False}}, "needs zmqEndpoint or discoverPods"),
    ({"indexerConfig": {"kvBlockIndexConfig": {"redisConfig": {"address": "x"}}}}, "not implemented here"),
    ({"indexerConfig": {"tokenizersPoolConfig": {}}}, "tokenizersPoolConfig: unknown parameter"),  # the loader drops it with a warning
    ({"tokenProcessorConfig": {"hashAlgorithm": "md5"}}, "not supported"),
    ({"kvEventsConfig": {"engineType": "sglang"}}, "only vllm"),
    ({"kvEventsConfig": {"podDiscoveryConfig": {"replaySocketPort": 5558}}}, "replay is not implemented"),
    ({"kvEventsConfig": {"zmqEndpont": "x"}}, "unknown parameter"),
])
def test_precise_config_errors(params, match):
    from epp.scheduling import registry
    from epp.scheduling.registry import PluginContext

    with pytest.raises(ConfigError, match=match):
        registry.create("precise-prefix-cache-producer", "p", params, PluginContext())


def test_discovered_endpoints_get_a_subscription(applier):
    class Store:
        def __init__(self, eps):
            self.eps = eps

        def endpoints(self):
            return self.eps

    store = Store([Endpoint("a", "127.0.0.1", 8000, labels={"llm-d.ai/inference-serving": "true"}), Endpoint("b", "127.0.0.1", 8001)])
    port = free_port()
    sub = KVEventsSubscriber(applier, EventsConfig(socket_port=port), store.endpoints)
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(f"tcp://127.0.0.1:{port}")  # vLLM's default: the engine binds, the EPP connects
    sub.start()
    try:
        assert wait_until(lambda: sub.connected == {"127.0.0.1:8000": f"tcp://127.0.0.1:{port}"}, timeout=5)
        n = 0

        def heard():
            nonlocal n
            pub.send_multipart([b"kv@ignored@m", seq(n), batch(stored([1], [1, 2, 3, 4]))])
            n += 1
            return applier.index.longest_prefix(applier.keys.keys(None, [1, 2, 3, 4], "m"), None, {}) == {"127.0.0.1:8000": 1.0}

        assert wait_until(heard, timeout=10, interval=0.1), "the pod is the endpoint the socket belongs to"
        store.eps = store.eps[1:]
        assert wait_until(lambda: sub.connected == {} and len(applier.index) == 0, timeout=5), "a removed endpoint's blocks go"
    finally:
        sub.stop()
        pub.close(0)


def test_events_of_pods_outside_the_pool_are_dropped(applier):
    applier.known_pods = {"10.0.0.8:8000"}
    applier.apply(TOPIC, seq(0), batch(stored([1], [1, 2, 3, 4])))
    assert len(applier.index) == 0 and applier.foreign == 1
    applier.known_pods.add(POD)
    applier.apply(TOPIC, seq(1), batch(stored([1], [1, 2, 3, 4])))
    assert len(applier.index) == 1
