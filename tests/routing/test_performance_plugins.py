"""Formulas and fallbacks of the performance-aware plugins."""

import time

import pytest

from epp.datastore import Datastore, Endpoint, EndpointMetrics, TransferProfile
from epp.scheduling import registry
from epp.scheduling.framework import ConfigError, CycleState, LLMRequest, ProfileRunResult, SchedulingResult
from epp.scheduling.registry import PluginContext

FAST = TransferProfile(blocks=(1, 10, 100), seconds=(0.001, 0.002, 0.011), block_tokens=16, backend="nvlink")
SLOW = TransferProfile(blocks=(1, 10, 100), seconds=(0.005, 0.020, 0.110), block_tokens=16, backend="fs")


def ep(name, profile=None, **metrics):
    e = Endpoint(name=name, address="10.0.0.1", port=8000 + len(name))
    e.metrics = EndpointMetrics(transfer_profile=profile, updated_at=time.monotonic(), **metrics)
    return e


def req(tokens=160):
    return LLMRequest(request_id="r", model="m", target_model="m", api="completions", prompt_tokens=tokens)


def make(type_name, params=None, ctx=None):
    return registry.create(type_name, type_name, params or {}, ctx or PluginContext())


def test_profile_interpolation():
    assert FAST.seconds_for_tokens(16) == pytest.approx(0.001)  # 1 block
    assert FAST.seconds_for_tokens(160) == pytest.approx(0.002)  # 10 blocks
    assert FAST.seconds_for_tokens(55 * 16) == pytest.approx(0.002 + 0.009 * 45 / 90)
    assert FAST.seconds_for_tokens(200 * 16) == pytest.approx(0.011 + 0.0001 * 100)  # extrapolated
    assert FAST.seconds_for_tokens(1) == pytest.approx(0.001)


def test_transfer_bandwidth_scorer_and_no_profile_fallback():
    s = make("transfer-bandwidth-scorer")
    st = CycleState()
    scores = s.score(st, req(160), [ep("fast", FAST), ep("slow", SLOW), ep("none")])
    assert scores == [1.0, pytest.approx(1 / (1 + 0.018 / 0.1)), 0.5]  # 2 vs 20 ms: 18 ms lost of a 100 ms scale
    assert st.notes["transfer-bandwidth-scorer"]["no_profile"] == ["none"]
    assert st.notes["transfer-bandwidth-scorer"]["estimate_ms"] == {"fast": 2.0, "slow": 20.0}
    assert s.score(CycleState(), req(), [ep("a"), ep("b")]) == [0.5, 0.5]  # no data anywhere: neutral, no error


def test_transfer_bandwidth_scorer_weighs_time_lost_not_speed_ratio():
    s = make("transfer-bandwidth-scorer", {"timeScale": "50ms"})
    short = s.score(CycleState(), req(16), [ep("fast", FAST), ep("slow", SLOW)])  # 1 vs 5 ms: 5x slower, 4 ms lost
    long = s.score(CycleState(), req(100 * 16), [ep("fast", FAST), ep("slow", SLOW)])  # 11 vs 110 ms: 10x, 99 ms lost
    assert short == [1.0, pytest.approx(1 / (1 + 0.004 / 0.05))] and short[1] > 0.9
    assert long == [1.0, pytest.approx(1 / (1 + 0.099 / 0.05))] and long[1] < 0.35
    with pytest.raises(ConfigError, match="timeScale"):
        make("transfer-bandwidth-scorer", {"timeScale": "soon"})


def test_transfer_time_filter_guardrail():
    f = make("transfer-time-filter", {"maxTransferTime": "10ms"})
    kept = f.filter(CycleState(), req(160), [ep("fast", FAST), ep("slow", SLOW), ep("none")])
    assert [e.name for e in kept] == ["fast", "none"]
    st = CycleState()
    kept = f.filter(st, req(100 * 16), [ep("fast", FAST), ep("slow", SLOW)])  # 11 ms and 110 ms: both over
    assert [e.name for e in kept] == ["fast", "slow"] and st.notes["transfer-time-filter"]["kept_all"] is True


def test_queue_running_kv_and_load_aware_scorers():
    eps = [ep("a", waiting=0, running=4, kv_cache_usage=0.2), ep("bb", waiting=5, running=2, kv_cache_usage=0.9), ep("ccc", waiting=10, running=0)]
    assert make("queue-scorer").score(CycleState(), req(), eps) == [1.0, 0.5, 0.0]
    assert make("running-requests-size-scorer").score(CycleState(), req(), eps) == [0.0, 0.5, 1.0]
    assert make("kv-cache-utilization-scorer").score(CycleState(), req(), eps) == [pytest.approx(0.8), pytest.approx(0.1), 1.0]
    la = make("load-aware-scorer", {"threshold": 128})
    assert la.score(CycleState(), req(), [ep("q0", waiting=0), ep("q64", waiting=64), ep("q200", waiting=200)]) == [0.5, 0.25, 0.0]
    assert make("queue-scorer").score(CycleState(), req(), [ep("a", waiting=3), ep("b", waiting=3)]) == [1.0, 1.0]


def test_stale_metrics_count_as_missing_and_are_named():
    stale = Endpoint(name="stale", address="10.0.0.9", port=1)
    stale.metrics = EndpointMetrics(waiting=50, updated_at=time.monotonic() - 60)
    fresh = ep("fresh", waiting=10)
    st = CycleState()
    s = make("queue-scorer", ctx=PluginContext(services={"metrics_staleness": 2.0}))
    assert s.score(st, req(), [stale, fresh]) == [1.0, 0.0]
    assert st.notes["queue-scorer"] == {"no_fresh_metrics": ["stale"]}


def result_for(target):
    return SchedulingResult("default", {"default": ProfileRunResult("default", [target], [target])})


def test_predicted_latency_model_and_booking():
    clock = [100.0]
    ds = Datastore()
    s = make("predicted-latency-scorer", {"defaultPrefillTokensPerSecond": 16000, "defaultDecodeSecondsPerToken": 0.01}, PluginContext(datastore=ds))
    s.clock = lambda: clock[0]
    fast, slow = ep("fast", FAST), ep("slow", SLOW, prefill_tokens_per_second=32000.0)
    st = CycleState()
    r0 = req(1600)
    r0.max_tokens = 11
    scores = s.score(st, r0, [fast, slow])  # 100 blocks: fast 0.1+0.011+0.01, slow 0.05+0.11+0.01
    est = st.read("predicted-latency")
    assert est["fast"]["ttft"] == pytest.approx(0.1 + 0.011 + 0.01)
    assert est["slow"]["ttft"] == pytest.approx(0.05 + 0.110 + 0.01)
    assert est["fast"]["e2e"] == pytest.approx(0.121 + 10 * 0.01)  # idle batch: no slowdown
    assert est["fast"]["delay"] == 0.0 and est["fast"]["cost"] == est["fast"]["e2e"]
    assert scores[0] == 1.0 and scores[1] == pytest.approx(0.221 / 0.27)
    # book three requests on `fast`: its stage is busy and its batch grows, so `slow` becomes the better choice
    reqs = [req(1600) for _ in range(3)]
    for r in reqs:
        s.pre_request(r, result_for(fast))
    st = CycleState()
    scores = s.score(st, req(1600), [fast, slow])
    est = st.read("predicted-latency")
    assert est["fast"]["wait"] == pytest.approx(3 * 0.111)
    assert est["fast"]["e2e"] == pytest.approx(4 * 0.111 + 0.01 + 63 * 0.01 * 1.15)  # 3 in flight: batch 15% slower
    # none of the three has started decoding: each will be slowed for all 63 of this request's later tokens
    assert est["fast"]["delay"] == pytest.approx(0.05 * 0.01 * 3 * 63)
    assert scores[1] == 1.0 and scores[0] < 1.0
    assert st.notes["predicted-latency-scorer"]["delay_to_others_ms"] == {"fast": pytest.approx(94.5)}
    # completions release the booking; time passing frees the stage
    for r in reqs[:2]:
        s.response_complete(r, None, "success")
    assert s._wait("fast", clock[0]) == pytest.approx(0.111 * 3)  # the last booking still ends at 3×
    clock[0] += 1.0
    assert s._wait("fast", clock[0]) == 0.0
    s.response_complete(reqs[2], None, "success")
    assert s._flights["fast"] == {} and s._where == {}


def test_predicted_latency_measured_decode_speed_is_unloaded():
    s = make("predicted-latency-scorer", {"batchSlowdown": 0.1})
    e = ep("e", decode_seconds_per_token=0.015)
    for _ in range(3):
        s.pre_request(req(16), result_for(e))
    st = CycleState()
    s.score(st, req(16), [e])
    assert st.read("predicted-latency")["e"]["spt"] == pytest.approx(0.015 / 1.2)  # measured with 3 in the batch


@pytest.mark.parametrize("weight, expected", [(0.0, "fast"), (1.0, "slow")])
def test_predicted_latency_counts_the_delay_imposed_on_the_batch(weight, expected):
    """Selfishly the fast fabric is quicker; counting what joining its batch costs the others, the slow one is."""
    clock = [100.0]
    s = make("predicted-latency-scorer", {"defaultPrefillTokensPerSecond": 16000, "defaultDecodeSecondsPerToken": 0.01,
                                          "contentionWeight": weight})
    s.clock = lambda: clock[0]
    fast, slow = ep("fast", FAST), ep("slow", SLOW)
    running = req(16)
    running.max_tokens = 64
    s.pre_request(running, result_for(fast))
    clock[0] += 0.05  # its prefill and transfer are done; it has decoded a few tokens
    r = req(800)  # 50 blocks: 6 ms over nvlink, 60 ms over fs
    r.max_tokens = 64
    st = CycleState()
    scores = s.score(st, r, [fast, slow])
    est = st.read("predicted-latency")
    assert est["fast"]["e2e"] < est["slow"]["e2e"]  # its own latency favours the fast fabric
    assert 0.025 < est["fast"]["delay"] < 0.0315  # ≈ 60 remaining tokens × 5% × 10 ms
    assert scores[["fast", "slow"].index(expected)] == 1.0


def test_predicted_latency_calibrates_from_observed_durations():
    clock = [0.0]
    s = make("predicted-latency-scorer", {"defaultPrefillTokensPerSecond": 10000, "defaultDecodeSecondsPerToken": 0.01})
    s.clock = lambda: clock[0]
    a, b = ep("a"), ep("b")
    r = req(1000)
    r.max_tokens = 11
    assert s.score(CycleState(), r, [a, b]) == [1.0, 1.0]  # 0.1 + 0.01 + 10 × 0.01 = 0.21 s each
    for _ in range(10):  # requests on `a` take twice what was predicted
        x = req(1000)
        x.max_tokens = 11
        s.score(CycleState(), x, [a])
        s.pre_request(x, result_for(a))
        clock[0] += 0.42
        s.response_complete(x, None, "success")
    assert 1.5 < s.calibration["a"] < 2.0  # EWMA moving towards the observed 2×
    st = CycleState()
    scores = s.score(st, r, [a, b])
    assert scores[1] == 1.0 and scores[0] < 0.7
    assert st.notes["predicted-latency-scorer"]["calibration"]["a"] == pytest.approx(s.calibration["a"], abs=1e-3)
    x = req(1000)
    s.score(CycleState(), x, [a])
    s.pre_request(x, result_for(a))
    before = s.calibration["a"]
    s.response_complete(x, None, "cancelled")  # only successes calibrate
    assert s.calibration["a"] == before


def test_predicted_latency_names_endpoints_without_fresh_metrics_and_keeps_their_last_speeds():
    s = make("predicted-latency-scorer", ctx=PluginContext(services={"metrics_staleness": 2.0}))
    old = Endpoint(name="old", address="10.0.0.7", port=1)
    old.metrics = EndpointMetrics(prefill_tokens_per_second=1000.0, updated_at=time.monotonic() - 60)
    st = CycleState()
    s.score(st, req(100), [old, ep("fresh")])
    assert st.notes["predicted-latency-scorer"]["no_fresh_metrics"] == ["old"]
    assert st.read("predicted-latency")["old"]["prefill"] == pytest.approx(0.1)  # last measured speed, not the default


def test_predicted_latency_never_takes_an_unmeasured_endpoint_for_the_fastest():
    """A vLLM named directly (no proxy, so no measured speeds) must not look faster than measured pairs."""
    s = make("predicted-latency-scorer")  # defaults 20,000 prefill tokens/s, 10 ms per token
    measured = [ep(f"pair{i}", prefill_tokens_per_second=5000.0, decode_seconds_per_token=0.03) for i in range(2)]
    direct = ep("direct")
    st = CycleState()
    scores = s.score(st, req(1000), [*measured, direct])
    est = st.read("predicted-latency")
    assert est["direct"]["prefill"] == pytest.approx(1000 / 5000) and est["direct"]["spt"] == pytest.approx(0.03)
    assert scores[2] <= max(scores[:2]), "as slow as the slowest measured, not the optimistic default"
    assert st.notes["predicted-latency-scorer"]["unmeasured"] == ["direct"]
    fast = [ep("quick", prefill_tokens_per_second=80000.0, decode_seconds_per_token=0.002)]
    st = CycleState()
    s.score(st, req(1000), [*fast, direct])
    assert st.read("predicted-latency")["direct"]["prefill"] == pytest.approx(1000 / 20000), "never faster than the defaults"


def test_predicted_latency_prices_a_recomputing_decode_as_a_prefill():
    s = make("predicted-latency-scorer")
    loads = ep("loads", SLOW, prefill_tokens_per_second=10000.0, decode_seconds_per_token=0.01)
    recomputes = ep("recomputes", FAST, prefill_tokens_per_second=10000.0, decode_seconds_per_token=0.01, kv_recompute_ratio=1.0)
    st = CycleState()
    s.score(st, req(1600), [loads, recomputes])
    est = st.read("predicted-latency")
    assert est["recomputes"]["transfer"] == pytest.approx(0.16) and est["loads"]["transfer"] == pytest.approx(0.110)
    assert st.notes["predicted-latency-scorer"]["kv_recomputing"] == {"recomputes": 1.0}


def test_predicted_latency_takes_small_speed_differences_for_noise():
    """Pairs on one busy host read speeds 20% apart: no preference; twice as slow is a real difference."""
    s = make("predicted-latency-scorer")
    a = ep("a", prefill_tokens_per_second=10000.0, decode_seconds_per_token=0.012)
    b = ep("b", prefill_tokens_per_second=8500.0, decode_seconds_per_token=0.010)
    assert s.score(CycleState(), req(500), [a, b]) == [1.0, 1.0]
    slow = ep("slow", prefill_tokens_per_second=4000.0, decode_seconds_per_token=0.025)
    st = CycleState()
    scores = s.score(st, req(500), [a, slow])
    assert scores[0] == 1.0 and scores[1] < 0.6
    assert st.read("predicted-latency")["slow"]["spt"] == pytest.approx(0.025)
    strict = make("predicted-latency-scorer", {"speedTolerance": 1})  # 1: every difference counts, as before
    assert min(strict.score(CycleState(), req(500), [a, b])) < 1.0
