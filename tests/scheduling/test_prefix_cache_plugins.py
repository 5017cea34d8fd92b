"""The plugins Go EPP default configs use: prefix cache (approximate), token load, LoRA affinity, no-hit LRU."""

import random
import struct
import time

import pytest
import xxhash

from epp.config import build, parse, resolve_config
from epp.datastore import Datastore, Endpoint, EndpointMetrics
from epp.scheduling import registry
from epp.scheduling.attributes import PREFIX_MATCH_KEY, PrefixCacheMatchInfo, put
from epp.scheduling.framework import ConfigError, CycleState, LLMRequest, ProfileRunResult, SchedulingResult
from epp.scheduling.registry import PluginContext
from epp.scheduling.tokens import estimate, pack
from epp.scrape.parse import parse_metrics
from producers.approx_prefix_cache import PrefixIndex, block_hashes

# GIE's and llm-d's built-in default (pkg/epp/config/loader/defaults.go): queue 2, KV cache 2, prefix 3
GIE_DEFAULT = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
"""


def ep(name, port=8000, **labels):
    return Endpoint(name=name, address="10.0.0.1", port=port, labels=labels)


def fresh(e, **metrics):
    values = {"waiting": 0.0, "running": 0.0, "kv_cache_usage": 0.0, **metrics}
    e.metrics = EndpointMetrics(updated_at=time.monotonic(), **values)
    return e


def chat(text, model="m", rid="r", **extra):
    body = {"model": model, "messages": [{"role": "system", "content": text}], **extra}
    return LLMRequest(request_id=rid, model=model, target_model=model, api="chat/completions", prompt_tokens=len(text) // 4, body=body)


def make(type_name, params=None, ctx=None):
    return registry.create(type_name, type_name, params or {}, ctx or PluginContext(services={"rng": random.Random(1)}))


def run_cycle(sched, request, endpoints):
    result = sched.schedule(request, endpoints)
    sched.pre_request(request, result)
    return result


def test_gie_default_config_loads_unchanged_and_routes_by_prefix():
    built = build(parse(GIE_DEFAULT, "gie-default.yaml"), PluginContext(services={"rng": random.Random(3)}))
    assert "approx-prefix-cache-producer" in built.plugins, "the scorer's producer is created, as llm-d does"
    eps = [fresh(ep(f"e{i}", 8000 + i)) for i in range(4)]
    system = "You are a careful assistant for a bank. " * 60  # ~2,400 bytes: 9 blocks of 64 pseudo-tokens
    first = run_cycle(built.scheduler, chat(system + "Q1", rid="a"), eps)
    home = first.targets[0].key
    assert first.primary.raw_scores["prefix-cache-scorer"] == {e.key: 0.0 for e in eps}
    again = run_cycle(built.scheduler, chat(system + "Q2 about loans", rid="b"), eps)
    scores = again.primary.raw_scores["prefix-cache-scorer"]
    assert again.targets[0].key == home and 0.8 < scores[home] < 1.0 and sum(scores.values()) == scores[home]
    note = again.notes["approx-prefix-cache-producer"]
    assert note["block_size_tokens"] == 64 and note["match_blocks"] == {home: note["total_blocks"] - 1}
    # load still counts: a busy home loses to an idle endpoint once queue and KV usage outweigh the hit
    fresh(eps[int(home[1:])], waiting=9.0, running=9.0, kv_cache_usage=0.95)
    busy = built.scheduler.schedule(chat(system + "Q3", rid="c"), eps)
    assert busy.targets[0].key != home


def test_block_hashes_are_llm_d_chained_xxh64():
    data = pack(b"x" * 520).tobytes()  # 130 pseudo-tokens: two blocks of 64 and a partial one
    hashes = block_hashes(data, "m", "", 64, 100)
    assert len(hashes) == 3, "the trailing partial block is hashed too"
    prev = xxhash.xxh64_intdigest(b"m")
    for i, h in enumerate(hashes):
        block_id = xxhash.xxh64_intdigest(data[i * 256:(i + 1) * 256])
        prev = xxhash.xxh64_intdigest(struct.pack("<QQ", block_id, prev))
        assert h == prev
    assert block_hashes(data, "m", "salt", 64, 100)[0] != hashes[0], "cache_salt isolates"
    assert block_hashes(data, "other", "", 64, 100)[0] != hashes[0], "the model seeds the chain"
    assert block_hashes(data, "m", "", 64, 2) == hashes[:2]
    changed = bytearray(data)
    changed[0] ^= 1
    assert all(a != b for a, b in zip(block_hashes(bytes(changed), "m", "", 64, 100), hashes)), "a prefix change changes every later block"


def test_estimated_tokens_pack_the_user_input():
    req = chat("hi", tools=[{"type": "function"}], cache_salt="s1")
    tp = estimate(req)
    assert tp.cache_salt == "s1" and tp.prompts[0].tobytes().startswith(b'[{"type":"function"}]systemhi')
    ids = LLMRequest("r", "m", "m", "completions", 3, body={"prompt": [5, 6, 7]})
    assert estimate(ids).prompts[0].tolist() == [5, 6, 7], "token-id prompts pass through"
    multi = LLMRequest("r", "m", "m", "completions", 3, body={"prompt": ["ab", "cd"]})
    assert len(estimate(multi).prompts) == 2


def test_block_size_auto_tune_and_floor():
    p = make("approx-prefix-cache-producer")
    assert p.block_size([ep("a")]) == 64, "vLLM's 16 is floored at 64 (llm-d#1158)"
    assert p.block_size([fresh(ep("a"), block_size=128)]) == 128
    assert make("approx-prefix-cache-producer", {"autoTune": False, "blockSizeTokens": 256}).block_size([fresh(ep("a"), block_size=128)]) == 256
    assert p.capacity(fresh(ep("a"), num_gpu_blocks=900)) == 900 and p.capacity(ep("b")) == 31250
    assert p.max_blocks(64) == 131072 // 64
    assert make("approx-prefix-cache-producer", {"maxPrefixTokensToMatch": 0, "maxPrefixBlocksToMatch": 7}).max_blocks(64) == 7


def test_index_is_bounded_per_endpoint_and_forgets_removed_endpoints():
    ix = PrefixIndex()
    ix.add(list(range(10)), "a", capacity=4)
    ix.add([100, 101], "b", capacity=4)
    assert ix.blocks() == {"a": 4, "b": 2} and set(ix.by_hash) == {6, 7, 8, 9, 100, 101}
    assert ix.match([6, 7, 8, 50]) == {"a": 3} and ix.match([0, 6]) == {}
    ix.add([6], "a", capacity=4)  # refreshed: now the most recent
    ix.add([11, 12, 13], "a", capacity=4)
    assert 6 in ix.servers["a"] and 7 not in ix.servers["a"]
    ix.remove("a")
    assert ix.blocks() == {"b": 2} and set(ix.by_hash) == {100, 101}
    store = Datastore()
    p = make("approx-prefix-cache-producer", ctx=PluginContext(datastore=store))
    a = store.upsert(ep("a"))
    p.index.add([1, 2], a.key, 10)
    store.remove(a.key)
    assert p.index.blocks() == {}


def test_legacy_scorer_parameters_configure_the_producer():
    cfg = parse("""
plugins:
- type: prefix-cache-scorer
  parameters: {hashBlockSize: 128, maxPrefixBlocksToMatch: 256, lruCapacityPerServer: 1000}
""", "gie-v1.0.yaml")
    built = build(cfg)
    producer = built.plugins["prefix-cache-scorer-producer"]
    assert (producer.block_size_tokens, producer.max_prefix_blocks, producer.lru_capacity) == (128, 256, 1000)
    assert built.plugins["prefix-cache-scorer"].producer == "prefix-cache-scorer-producer"


@pytest.mark.parametrize("text, match", [
    ("- type: prefix-cache-scorer\n  parameters: {prefixMatchInfoProducerName: nope}", "no plugin named 'nope'"),
    ("- type: prefix-cache-scorer\n  parameters: {prefixMatchInfoProducerName: queue-scorer}\n- type: queue-scorer", "is a queue-scorer"),
    ("- type: approx-prefix-cache-producer\n- type: prefix-cache-scorer\n  parameters: {lruCapacityPerServer: 5}", "move them there"),
    ("- type: prefix-cache-scorer\n  parameters: {mode: cache_tracking, kvEventsConfig: {}}", "precise-prefix-cache-producer"),
    ("- type: prefix-cache-scorer\n  parameters: {matchLengthWeight: 2}", r"matchLengthWeight must be a number in \[0.0, 1.0\]"),
    ("- type: approx-prefix-cache-producer\n  parameters: {blokSize: 5}", "unknown parameter"),
    ("- type: approx-prefix-cache-producer\n  parameters: {autoTune: false, blockSizeTokens: 0}", "must be > 0"),
])
def test_config_errors_name_the_plugin_and_field(text, match):
    with pytest.raises(ConfigError, match=match):
        build(parse("plugins:\n" + text + "\n", "t.yaml"))


def test_match_length_weight_favours_long_matches():
    s = make("prefix-cache-scorer", {"matchLengthWeight": 0.5, "matchLengthScaleTokens": 1024})
    s.producer = "p"
    state = CycleState()
    put(state, PREFIX_MATCH_KEY, "p", {"a": PrefixCacheMatchInfo(8, 16, 64), "b": PrefixCacheMatchInfo(1, 2, 64)})
    assert s.score(state, None, [ep("a"), ep("b"), ep("c")]) == [
        pytest.approx(0.5 * (512 / 1024) ** 2 + 0.5 * 0.5), pytest.approx(0.5 * (64 / 1024) ** 2 + 0.5 * 0.5), 0.0]
    assert s.score(CycleState(), None, [ep("a")]) == [0.0], "no match data scores 0"


def test_no_hit_lru_spreads_cold_requests_and_stays_neutral_when_warm():
    built = build(parse("""
plugins:
- type: prefix-cache-scorer
- type: no-hit-lru-scorer
  parameters: {lruSize: 8}
""", "t.yaml"), PluginContext(services={"rng": random.Random(0)}))
    lru = built.plugins["no-hit-lru-scorer"]
    assert lru.producer == "approx-prefix-cache-producer", "prefixPluginName's scorer shares its producer"
    eps = [fresh(ep(n, 9000 + i)) for i, n in enumerate("abcd")]
    picked = [run_cycle(built.scheduler, chat(f"{i} unrelated " * 40, rid=str(i)), eps).targets[0].key for i in range(4)]
    assert sorted(picked) == ["a", "b", "c", "d"], "four cold requests, four different endpoints"
    lru.lru.clear()
    lru.lru.update({"c": None, "a": None})  # c least recently used, then a
    assert lru.score(CycleState(), None, eps) == [pytest.approx(1 - 3 / 3), pytest.approx(1.0), pytest.approx(1 - 2 / 3), pytest.approx(1 - 1 / 3)]
    warm = CycleState()
    put(warm, PREFIX_MATCH_KEY, lru.producer, {"b": PrefixCacheMatchInfo(1, 4, 64)})
    assert lru.score(warm, None, eps) == [0.5] * 4
    assert lru.score(CycleState(), None, eps[:1]) == [1.0]


def test_token_load_counts_uncached_tokens_in_flight_and_releases_them():
    built = build(parse("""
plugins:
- type: prefix-cache-scorer
- type: token-load-scorer
  parameters: {queueThresholdTokens: 1000}
- type: inflight-load-producer
  parameters: {addEstimatedOutputTokens: true, outputRatio: 0.5, maxEstimatedOutputTokens: 40}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: token-load-scorer}]
""", "t.yaml"), PluginContext(services={"rng": random.Random(0)}))
    producer = built.plugins["inflight-load-producer"]
    assert built.plugins["token-load-scorer"].producer == "inflight-load-producer"
    eps = [ep("a", 1), ep("b", 2)]
    req = LLMRequest("r1", "m", "m", "completions", 300, body={"prompt": "p " * 600})
    first = run_cycle(built.scheduler, req, eps)
    home = first.targets[0].key
    assert producer.tokens == {home: 300 + 40} and producer.requests == {home: 1}
    second = built.scheduler.schedule(LLMRequest("r2", "m", "m", "completions", 100, body={"prompt": "q " * 200}), eps)
    scores = second.primary.raw_scores["token-load-scorer"]
    other = next(k for k in scores if k != home)
    assert scores[home] == pytest.approx(1 - 440 / 1000) and scores[other] == pytest.approx(1 - 100 / 1000)
    built.scheduler.response_complete(req, first, "cancelled")
    built.scheduler.response_complete(req, first, "cancelled")  # released once only
    assert producer.tokens == {} and producer.requests == {} and producer.in_flight() == 0


def test_inflight_tokens_leave_out_the_cached_prefix():
    p = make("inflight-load-producer")
    state = CycleState()
    put(state, PREFIX_MATCH_KEY, "approx-prefix-cache-producer", {"a": PrefixCacheMatchInfo(3, 4, 64)})
    req = LLMRequest("r", "m", "m", "completions", 300)
    assert p.uncached(state, req, [ep("a"), ep("b")]) == {"a": 300 - 192, "b": 300}


LORA_METRICS = """
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="2",running_lora_adapters="old",waiting_lora_adapters=""} 100.0
vllm:lora_requests_info{max_lora="2",running_lora_adapters="sql-lora",waiting_lora_adapters="chat-lora"} 200.0
"""


def test_lora_requests_info_is_scraped_from_the_newest_series():
    m = parse_metrics(LORA_METRICS)
    assert m.running_loras == {"sql-lora"} and m.waiting_loras == {"chat-lora"} and m.max_loras == 2
    assert parse_metrics("vllm:num_requests_running 1\n").running_loras is None


def test_lora_affinity_vectors():
    s = make("lora-affinity-scorer")
    now = time.monotonic()

    def with_lora(name, running, waiting, max_lora):
        e = ep(name)
        e.metrics = EndpointMetrics(running_loras=frozenset(running), waiting_loras=frozenset(waiting), max_loras=max_lora, updated_at=now)
        return e

    eps = [with_lora("active", ["sql"], [], 1), with_lora("free", ["x"], [], 2), with_lora("waiting", ["x"], ["sql"], 2),
           with_lora("full", ["x", "y"], [], 2), ep("unknown")]
    state = CycleState()
    req = LLMRequest("r", "sql", "sql", "completions", 10)
    assert s.score(state, req, eps) == [1.0, 0.8, 0.6, 0.0, 0.0]
    assert state.notes["lora-affinity-scorer"] == {"no_lora_metrics": ["unknown"]}


def test_predicted_latency_counts_only_the_uncached_prefill():
    s = make("predicted-latency-scorer", {"defaultPrefillTokensPerSecond": 1000})
    a, b = ep("a", 1), ep("b", 2)
    req = LLMRequest("r", "m", "m", "completions", 2000, max_tokens=1)
    state = CycleState()
    put(state, PREFIX_MATCH_KEY, "approx-prefix-cache-producer", {"a": PrefixCacheMatchInfo(25, 31, 64)})
    est = s.estimate(state, req, [a, b])
    assert est["a"]["prefill"] == pytest.approx((2000 - 1600) / 1000) and est["b"]["prefill"] == pytest.approx(2.0)
    assert s.score(state, req, [a, b])[0] == 1.0


def test_published_profiles_load():
    for name in ("prefix-cache", "precise-prefix-cache", "load-only"):
        build(resolve_config(profile=name))


def test_default_profile_leaves_producers_out():
    built = build(parse("plugins:\n- type: approx-prefix-cache-producer\n- type: prefix-cache-scorer\n", "t.yaml"))
    prof = built.scheduler.profiles["default"]
    assert [w.scorer.name for w in prof.scorers] == ["prefix-cache-scorer"] and prof.filters == []
    result = SchedulingResult("default", {"default": ProfileRunResult("default", [], [])})
    built.plugins["approx-prefix-cache-producer"].pre_request(chat("x"), result)  # nothing scheduled: no-op


def test_token_producer_uses_the_models_tokenizer_and_chat_template(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "hello", "world", "again"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>", "<|user|>", "<|assistant|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    template = "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|> {{ m.content }} {% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    (tmp_path / "tokenizer_config.json").write_text(__import__("json").dumps({"bos_token": "<s>", "chat_template": template}))
    producer = make("token-producer", {"modelName": "tiny", "tokenizerPath": str(tmp_path)})
    req = chat("hello world again")
    req.body["messages"][0]["role"] = "user"
    tp = producer.tokenize(req)
    assert tp.prompts[0].tolist() == [1, 3, 5, 6, 7, 4] and not tp.estimated
    state = CycleState()
    producer.produce(state, req, [])
    from epp.scheduling.tokens import tokenized_prompt

    assert tokenized_prompt(state, req) is state.read("TokenizedPrompt"), "the prefix producers read what it left"
    assert make("token-producer").tokenize(req).estimated
    for params, match in (({"vllm": {"url": "http://x"}}, "not implemented here"), ({"tokenizerPath": str(tmp_path / "nope")}, "no tokenizer.json")):
        with pytest.raises(ConfigError, match=match):
            make("token-producer", params)
