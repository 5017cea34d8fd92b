"""The scheduling cycle (clamp × weight, filters, errors) and EndpointPickerConfig loading/defaulting."""

import pytest

from epp.config import build, list_profiles, parse, resolve_config
from epp.datastore import Endpoint
from epp.scheduling.framework import ConfigError, LLMRequest, SchedulingError
from epp.scheduling.registry import register


def ep(name, **labels):
    return Endpoint(name=name, address="10.0.0.1", port=8000 + len(name), labels=labels)


REQ = LLMRequest(request_id="r", model="m", target_model="m", api="completions", prompt_tokens=10)


class FixedScorer:
    type_name = "fixed-test-scorer"

    def __init__(self, name, scores):
        self.name, self.scores = name, scores

    def score(self, state, request, endpoints):
        return [self.scores[e.name] for e in endpoints]


@register("fixed-test-scorer")
def _fixed(name, params, ctx):
    return FixedScorer(name, params["scores"])


def test_scores_are_clamped_weighted_and_summed():
    cfg = parse(
        """
plugins:
- {type: fixed-test-scorer, name: s1, parameters: {scores: {a: 2.0, bb: 0.5}}}
- {type: fixed-test-scorer, name: s2, parameters: {scores: {a: -1.0, bb: 0.5}}}
schedulingProfiles:
- name: p
  plugins:
  - {pluginRef: s1, weight: 2}
  - {pluginRef: s2, weight: 3}
""",
        "t.yaml",
    )
    seen = []
    sched = build(cfg, observer=lambda *a: seen.append(a[:3])).scheduler
    result = sched.schedule(REQ, [ep("a"), ep("bb")])
    run = result.primary
    assert run.raw_scores == {"s1": {"a": 1.0, "bb": 0.5}, "s2": {"a": 0.0, "bb": 0.5}}
    assert run.weighted_totals == {"a": 2.0, "bb": 2.5}
    assert result.targets[0].name == "bb"
    assert run.picker == "max-score-picker"  # defaulted
    points = {s[0] for s in seen}
    assert {"ProfilePicker", "Scorer", "Picker", "ProcessProfilesResults"} <= points


def test_errors_carry_codes_and_partial_results():
    sched = build(resolve_config(profile="proxy-performance-by-backend")).scheduler
    with pytest.raises(SchedulingError) as e:
        sched.schedule(REQ, [])
    assert e.value.code == "ServiceUnavailable"
    with pytest.raises(SchedulingError) as e:
        sched.schedule(REQ, [ep("fs1", **{"llm-d.ai/kv-backend": "fs"})])
    assert e.value.code == "ResourceExhausted"
    assert e.value.result.primary.filtered_out == {"by-kv-backend": ["fs1"]}


def test_no_profiles_section_defaults_to_one_profile_with_every_plugin():
    cfg = parse("plugins:\n- type: active-request-scorer\n- type: decode-filter\n", "t.yaml")
    desc = build(cfg).scheduler.describe()
    assert desc == {
        "profileHandler": "single-profile-handler",
        "profiles": {"default": {"filters": ["decode-filter"], "scorers": [{"name": "active-request-scorer", "weight": 1.0}], "picker": "max-score-picker"}},
    }


def test_go_epp_config_loads_unchanged():
    text = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: single-profile-handler
- name: by-kv-backend
  type: label-selector-filter
  parameters:
    matchLabels: {llm-d.ai/kv-backend: nvlink}
- type: active-request-scorer
  parameters: {requestTimeout: "2m", idleThreshold: 0, maxBusyScore: 1.0}
- type: max-score-picker
  parameters: {maxNumOfEndpoints: 1}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: by-kv-backend
  - pluginRef: active-request-scorer
    weight: 1
  - pluginRef: max-score-picker
"""
    built = build(parse(text, "go.yaml"))
    assert built.scheduler.describe()["profiles"]["default"]["filters"] == ["by-kv-backend"]


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("kind: Foo\nplugins: [{type: max-score-picker}]\n", "t.yaml:1: kind: must be EndpointPickerConfig"),
        ("plugins: []\n", "t.yaml:1: plugins: must be a non-empty list"),
        ("plugins:\n- {type: max-score-picker}\n- {type: max-score-picker}\n", "t.yaml:3: plugins[1].name: duplicate plugin name"),
        ("plugins:\n- {type: max-score-picker, colour: red}\n", "t.yaml:2: plugins[0].colour: unknown field"),
        ("plugins:\n- {type: max-score-picker}\nschedulingProfiles:\n- name: a\n  plugins:\n  - {pluginRef: max-score-picker, weight: -1}\n", "t.yaml:6: schedulingProfiles[0].plugins[0].weight"),
        ("plugins:\n- {type: max-score-picker}\nextra: 1\n", "t.yaml:3: extra: unknown field"),
    ],
)
def test_validation_errors_name_file_line_and_field(text, fragment):
    with pytest.raises(ConfigError) as e:
        build(parse(text, "t.yaml"))
    assert fragment in str(e.value)


def test_profile_resolution(monkeypatch):
    assert {"default", "proxy-performance", "proxy-performance-by-backend"} <= set(list_profiles())
    monkeypatch.setenv("EPP_CONFIG_PROFILE", "proxy-performance")
    assert resolve_config().profile == "proxy-performance"
    monkeypatch.delenv("EPP_CONFIG_PROFILE")
    assert resolve_config().profile == "default"
    with pytest.raises(ConfigError, match="give only one of"):
        resolve_config(config_file="a.yaml", config_text="plugins: []")
    for name in list_profiles():
        build(resolve_config(profile=name))  # every shipped profile builds
