"""llm-d's P/D plugins: disagg-profile-handler, its deciders, the deprecated handlers, the header and the metric."""

import pytest

from epp.scheduling.attributes import PREFIX_MATCH_KEY, PrefixCacheMatchInfo, put
from epp.scheduling.framework import ConfigError, CycleState, SchedulingError
from tests.disagg.conftest import Built, pod, request

PD = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefill-filter
- type: decode-filter
- type: max-score-picker
- type: disagg-profile-handler
  parameters:
    {handler}
- type: prefix-based-pd-decider
  parameters:
    nonCachedTokens: 16
    promptTokens: {prompt_tokens}
- type: always-disagg-pd-decider
schedulingProfiles:
- name: prefill
  plugins: [{{pluginRef: prefill-filter}}, {{pluginRef: max-score-picker}}]
- name: decode
  plugins: [{{pluginRef: decode-filter}}, {{pluginRef: max-score-picker}}]
"""


def pd(handler="deciders: {prefill: prefix-based-pd-decider}", prompt_tokens=0, endpoints=None):
    eps = endpoints or [pod("p", "prefill", "10.0.0.1"), pod("d", "decode", "10.0.0.2")]
    return Built(PD.format(handler=handler, prompt_tokens=prompt_tokens), eps)


def test_decode_first_prefix_decider_writes_the_prefill_header_and_counts():
    b = pd()
    short, long = request(8, "short"), request(200, "long")
    r1 = b.route(short)
    assert [e.hostport for e in r1.targets] == ["10.0.0.2:8000"]  # the decode pod is the destination
    assert r1.request_headers == {}
    assert r1.notes["disaggregation"]["decision"] == "decode-only"
    assert "prompt 8 tokens < nonCachedTokens 16" in r1.notes["disaggregation"]["prefill_decider"]["reason"]
    r2 = b.route(long)
    assert [e.hostport for e in r2.targets] == ["10.0.0.2:8000"]
    assert r2.request_headers == {"x-prefiller-host-port": "10.0.0.1:8000"}
    note = r2.notes["disaggregation"]
    assert (note["decision"], note["decode"], note["prefill"]) == ("prefill-decode", "10.0.0.2:8000", "10.0.0.1:8000")
    assert note["prefill_decider"]["disaggregate"] is True and note["prefill_decider"]["name"] == "prefix-based-pd-decider"
    assert r2.stages == {"decode": "decode", "prefill": "prefill"} and r2.stage_target("prefill").name == "p"
    labels = dict(plugin_name="disagg-profile-handler", plugin_type="disagg-profile-handler", model_name="m")
    assert b.metric("llm_d_epp_disagg_decision_total", decision_type="decode-only", **labels) == 1
    assert b.metric("llm_d_epp_disagg_decision_total", decision_type="prefill-decode", **labels) == 1
    assert b.metric("llm_d_inference_scheduler_disagg_decision_total", model_name="m", decision_type="prefill-decode") == 1


def test_prefix_decider_subtracts_cached_tokens_and_honours_prompt_tokens():
    b = pd(prompt_tokens=100)
    decider = b.plugins["prefix-based-pd-decider"]
    d = b.endpoint("d")
    state = CycleState()
    assert not decider.decide(state, request(50), d).disaggregate  # under promptTokens
    put(state, PREFIX_MATCH_KEY, "approx-prefix-cache-producer", {d.key: PrefixCacheMatchInfo(19, 20, 10)})  # 190 tokens
    no = decider.decide(state, request(200), d)
    assert not no.disaggregate and "uncached 10 tokens < nonCachedTokens 16" in no.reason and no.details["cached_tokens"] == 190
    put(state, PREFIX_MATCH_KEY, "approx-prefix-cache-producer", {d.key: PrefixCacheMatchInfo(10, 20, 10)})  # 100 tokens
    assert decider.decide(state, request(200), d).disaggregate


def test_prefix_decider_zero_never_disaggregates_and_bad_values_are_errors():
    assert not pd().plugins["prefix-based-pd-decider"].__class__("x", 0, 0).decide(CycleState(), request(10_000), None).disaggregate
    with pytest.raises(ConfigError, match="promptTokens cannot be negative"):
        pd(prompt_tokens=-1)
    with pytest.raises(ConfigError, match=r"threshold: unknown parameter"):
        Built(PD.format(handler="deciders: {prefill: prefix-based-pd-decider}", prompt_tokens=0).replace("nonCachedTokens: 16", "threshold: 1"),
              [pod("d", "decode", "10.0.0.2")])


def test_no_prefill_candidate_serves_decode_only():
    b = pd(handler="deciders: {prefill: always-disagg-pd-decider}", endpoints=[pod("d", "decode", "10.0.0.2")])
    r = b.route(request(500))
    assert r.request_headers == {} and r.notes["disaggregation"]["decision"] == "decode-only"
    assert "prefill-filter" in r.notes["disaggregation"]["prefill_failed"]


def test_no_decode_candidate_fails_with_llm_d_message():
    b = pd(handler="deciders: {prefill: always-disagg-pd-decider}", endpoints=[pod("p", "prefill", "10.0.0.1")])
    with pytest.raises(SchedulingError, match="failed to find available decode workers"):
        b.route(request(500))
    assert b.metric("llm_d_epp_disagg_decision_total", plugin_name="disagg-profile-handler", plugin_type="disagg-profile-handler",
                    model_name="m", decision_type="decode-only") == 0


def test_unlabelled_pods_are_decode_only_candidates():
    b = pd(handler="deciders: {prefill: always-disagg-pd-decider}", endpoints=[pod("u", None, "10.0.0.9"), pod("p", "prefill", "10.0.0.1")])
    r = b.route(request(500))
    assert r.targets[0].name == "u" and r.request_headers["x-prefiller-host-port"] == "10.0.0.1:8000"


def test_prefill_first_runs_prefill_then_decode_with_the_prefill_pick_as_peer():
    b = pd(handler="stageOrder: Prefill_First")
    r = b.route(request(5))  # no decider in this order: prefill runs whenever its profile exists
    assert r.targets[0].name == "d" and r.request_headers == {"x-prefiller-host-port": "10.0.0.1:8000"}
    assert r.notes["disaggregation"]["stage_order"] == "prefill-first"
    with pytest.raises(ConfigError, match="prefill decider is not supported in prefill-first"):
        pd(handler="{stageOrder: prefill-first, deciders: {prefill: always-disagg-pd-decider}}")
    with pytest.raises(ConfigError, match="invalid stage order 'sideways'"):
        pd(handler="stageOrder: sideways")


def test_without_a_prefill_decider_decode_first_never_prefills():
    b = pd(handler="profiles: {decode: decode}")
    assert b.route(request(5000)).request_headers == {}


def test_legacy_flat_parameters_and_mixing_errors():
    b = pd(handler="{decodeProfile: decode, prefillDeciderPluginName: always-disagg-pd-decider}")
    assert b.route(request(5)).request_headers == {"x-prefiller-host-port": "10.0.0.1:8000"}
    b = pd(handler="{deciderPluginName: always-disagg-pd-decider}")
    assert b.route(request(5)).request_headers
    with pytest.raises(ConfigError, match="use one format exclusively"):
        pd(handler="{decodeProfile: decode, deciders: {prefill: always-disagg-pd-decider}}")
    with pytest.raises(ConfigError, match="deciders.prefill plugin not found: 'nope'"):
        pd(handler="deciders: {prefill: nope}")
    with pytest.raises(ConfigError, match="'max-score-picker' .* is not a decider"):
        pd(handler="deciders: {prefill: max-score-picker}")
    with pytest.raises(ConfigError, match=r"deciders.pre: unknown field"):
        pd(handler="deciders: {pre: x}")


def test_profile_names_are_checked_against_the_config():
    with pytest.raises(ConfigError, match="needs a scheduling profile named 'dec'"):
        pd(handler="profiles: {decode: dec}")
    text = PD.format(handler="deciders: {prefill: always-disagg-pd-decider}", prompt_tokens=0) + """- name: extra
  plugins: [{pluginRef: max-score-picker}]
"""
    with pytest.raises(ConfigError, match="never runs profile.s. extra"):
        Built(text, [pod("d", "decode", "10.0.0.2")])


def test_encode_stage_for_multimodal_requests():
    text = """
    plugins:
    - type: encode-filter
    - type: decode-filter
    - type: always-disagg-multimodal-decider
    - type: disagg-profile-handler
      parameters: {deciders: {encode: always-disagg-multimodal-decider}}
    schedulingProfiles:
    - {name: encode, plugins: [{pluginRef: encode-filter}]}
    - {name: decode, plugins: [{pluginRef: decode-filter}]}
    """
    b = Built(text, [pod("e1", "encode", "10.0.0.5"), pod("d", "decode", "10.0.0.2")])
    image = {"messages": [{"role": "user", "content": [{"type": "text", "text": "what"}, {"type": "image_url", "image_url": {"url": "x"}}]}]}
    r = b.route(request(50, body=image))
    assert r.request_headers == {"x-encoder-hosts-ports": "10.0.0.5:8000"} and r.notes["disaggregation"]["decision"] == "encode-decode"
    r = b.route(request(50, body={"messages": [{"role": "user", "content": "text"}]}))
    assert r.request_headers == {} and r.notes["disaggregation"]["encode_decider"]["reason"] == "text only"


PD_V03 = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefill-header-handler
- type: prefill-filter
- type: decode-filter
- type: max-score-picker
- type: pd-profile-handler
  parameters: {params}
schedulingProfiles:
- name: prefill
  plugins: [{{pluginRef: prefill-filter}}, {{pluginRef: max-score-picker}}]
- name: decode
  plugins: [{{pluginRef: decode-filter}}, {{pluginRef: max-score-picker}}]
"""


def test_deprecated_pd_profile_handler_v03_threshold_in_characters():
    b = Built(PD_V03.format(params="{threshold: 10, hashBlockSize: 5}"), [pod("p", "prefill", "10.0.0.1"), pod("d", "decode", "10.0.0.2")])
    assert b.route(request(1, text="hi")).request_headers == {}
    r = b.route(request(10, text="x" * 40))
    assert r.request_headers == {"x-prefiller-host-port": "10.0.0.1:8000"}
    labels = dict(plugin_name="pd-profile-handler", plugin_type="pd-profile-handler", model_name="m")
    assert b.metric("llm_d_epp_pd_decision_total", decision_type="prefill-decode", **labels) == 1
    assert b.metric("llm_d_epp_pd_decision_total", decision_type="decode-only", **labels) == 1


def test_deprecated_pd_profile_handler_without_decider_always_disaggregates_like_v04():
    b = Built(PD_V03.format(params="{}"), [pod("p", "prefill", "10.0.0.1"), pod("d", "decode", "10.0.0.2")])
    assert b.route(request(1)).request_headers == {"x-prefiller-host-port": "10.0.0.1:8000"}


def test_deprecated_pd_profile_handler_with_decider_and_primary_port():
    text = PD_V03.format(params="{deciderPluginName: dec, primaryPort: 8000}").replace(
        "- type: max-score-picker", "- type: max-score-picker\n- {type: prefix-based-pd-decider, name: dec, parameters: {nonCachedTokens: 8}}")
    b = Built(text, [pod("p", "prefill", "10.0.0.1"), pod("d", "decode", "10.0.0.2", port=8003)])
    r = b.route(request(100))
    assert [e.hostport for e in r.targets] == ["10.0.0.2:8000"]  # rank port rewritten to the primary port
    assert r.request_headers == {"x-data-parallel-host-port": "10.0.0.2:8003", "x-prefiller-host-port": "10.0.0.1:8000"}
    with pytest.raises(ConfigError, match="invalid decider plugin|deciders.prefill plugin not found: 'nope'"):
        Built(PD_V03.format(params="{deciderPluginName: nope}"), [pod("d", "decode", "10.0.0.2")])
    with pytest.raises(ConfigError, match="cannot be combined with deciderPluginName"):
        Built(PD_V03.format(params="{deciderPluginName: dec, threshold: 3}"), [pod("d", "decode", "10.0.0.2")])
    with pytest.raises(ConfigError, match="invalid primaryPort"):
        Built(PD_V03.format(params="{primaryPort: 70000}"), [pod("d", "decode", "10.0.0.2")])
