"""The EndpointPickerConfig loader as a Go EPP user meets it: both apiVersions, every section, every error at once."""

from __future__ import annotations

import textwrap

import pytest

from epp.config import ConfigErrors, build, parse
from epp.flowcontrol.policies import RoundRobinFairnessPolicy
from epp.scheduling.framework import ConfigError

HEAD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"


def load(text: str, **kw):
    return build(parse(textwrap.dedent(text), "c.yaml"), **kw)


def problems(text: str, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        load(text, **kw)
    return str(e.value)


def test_both_api_versions_and_the_deprecation_warning():
    assert not load(HEAD + "plugins: [{type: queue-scorer}]\n").warnings
    old = load("apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins: [{type: queue-scorer}]\n")
    assert any("DEPRECATION: inference.networking.x-k8s.io/v1alpha1 is deprecated; use llm-d.ai/v1alpha1" in w for w in old.warnings)
    assert "c.yaml:1: apiVersion: unsupported 'v1'" in problems("apiVersion: v1\nplugins: [{type: queue-scorer}]\n")


def test_every_error_in_a_file_is_reported_at_once_in_line_order():
    text = problems(HEAD + """\
featureGates: [flowControl, warpDrive]
plugins:
- type: queue-scorer
  parameters: {blockSize: 4}
- type: data-parallel-profile-handler
- type: kv-cache-utilization-scorer
- type: max-score-picker
  parameters: {maxNumOfEndpoints: 0}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: heavy
  - pluginRef: nope
flowControl:
  maxRequests: lots
""")
    lines = text.splitlines()
    assert lines[0] == "7 problems in c.yaml:"
    expected = [
        "c.yaml:3: featureGates[1]: feature gate 'warpDrive' is unknown",
        "c.yaml:6: plugins[0].parameters.blockSize: unknown parameter for 'queue-scorer'",
        "c.yaml:7: plugins[1].type: plugin type 'data-parallel-profile-handler' is a Go EPP profile handler plugin (llm-d) "
        "that is not implemented in this EPP; the closest plugin here is 'single-profile-handler'",
        "c.yaml:10: plugins[3].parameters.maxNumOfEndpoints: maxNumOfEndpoints must be a positive integer",
        "c.yaml:15: schedulingProfiles[0].plugins[0].weight: must be a number, got 'heavy'",
        "c.yaml:16: schedulingProfiles[0].plugins[1].pluginRef: no plugin named 'nope'",
        "c.yaml:18: flowControl.maxRequests: invalid quantity 'lots'",
    ]
    for line, want in zip(lines[1:], expected):
        assert want in line, (line, want)


def test_unknown_types_say_what_they_are():
    text = problems(HEAD + "plugins:\n- type: quue-scorer\n- type: vllmgrpc-parser\n")
    assert "unknown plugin type 'quue-scorer'; did you mean 'queue-scorer'?" in text
    assert "'vllmgrpc-parser' is a Go EPP parser plugin" in text and "the closest plugin here is 'passthrough-parser'" in text


def test_data_layer_and_its_older_spelling():
    new = load(HEAD + """\
plugins:
- type: queue-scorer
- type: metrics-data-source
  parameters: {scheme: https, path: /custom, insecureSkipVerify: false}
- type: core-metrics-extractor
dataLayer:
  sources:
  - pluginRef: metrics-data-source
    extractors: [{pluginRef: core-metrics-extractor}]
""")
    src = new.data_layer.metrics_source
    assert (src.scheme, src.path, src.insecure_skip_verify, new.data_layer.explicit) == ("https", "/custom", False, True)
    old = load(HEAD + "plugins:\n- type: queue-scorer\n- type: metrics-data-source\ndata:\n  sources: [{pluginRef: metrics-data-source}]\n")
    assert old.data_layer.explicit and any("DEPRECATION: data is GIE v1.3–v1.4's spelling" in w for w in old.warnings)
    off = load(HEAD + "plugins: [{type: queue-scorer}]\ndataLayer: {injectDefaults: false}\n")
    assert off.data_layer.metrics_source is None and any("endpoint metrics are not collected" in w for w in off.warnings)
    assert "give dataLayer or its older spelling data, not both" in problems(HEAD + "plugins: [{type: queue-scorer}]\ndataLayer: {}\ndata: {}\n")
    assert "cross-replica state sync (active-active) is not implemented" in problems(
        HEAD + "plugins: [{type: queue-scorer}]\ndataLayer: {crossReplicaSyncerPluginRef: x}\n")
    assert "defaultEngine 'sglang' is not implemented here" in problems(
        HEAD + "plugins:\n- type: core-metrics-extractor\n  parameters: {defaultEngine: sglang}\n")


def test_file_discovery_is_a_data_layer_discovery_plugin(tmp_path):
    built = load(HEAD + f"plugins:\n- type: file-discovery\n  parameters: {{path: {tmp_path}/e.yaml, watchFile: true}}\n"
                        "- type: queue-scorer\ndataLayer:\n  discovery: {pluginRef: file-discovery}\n")
    assert built.data_layer.discovery.path == f"{tmp_path}/e.yaml" and built.data_layer.discovery.watch


def test_parsers_new_and_deprecated_sections():
    default = load(HEAD + "plugins: [{type: queue-scorer}]\n")
    assert [p.type_name for p in default.parsers.parsers] == ["openai-parser"]
    chain = load(HEAD + "plugins:\n- type: queue-scorer\n- type: openai-parser\n- type: passthrough-parser\n"
                        "requestHandler:\n  parsers: [{pluginRef: openai-parser}, {pluginRef: passthrough-parser}]\n")
    assert [p.type_name for p in chain.parsers.parsers] == ["openai-parser", "passthrough-parser"]
    old = load(HEAD + "plugins:\n- type: queue-scorer\n- type: passthrough-parser\nparser: {pluginRef: passthrough-parser}\n")
    assert [p.type_name for p in old.parsers.parsers] == ["passthrough-parser"]
    assert any("DEPRECATION: top-level parser is deprecated" in w for w in old.warnings)
    assert "plugin 'queue-scorer' (queue-scorer) is not a parser" in problems(
        HEAD + "plugins: [{type: queue-scorer}]\nrequestHandler: {parsers: [{pluginRef: queue-scorer}]}\n")


def test_passthrough_parser_forwards_any_body():
    chain = load(HEAD + "plugins:\n- type: random-picker\n- type: passthrough-parser\n"
                        "requestHandler: {parsers: [{pluginRef: passthrough-parser}]}\n").parsers
    req = chain.parse("r", "/v1/rerank", {}, b"\x00not json at all")
    assert (req.model, req.api, req.body, req.body_size) == ("", "passthrough", None, 16)


def test_feature_gates():
    gates = load(HEAD + "featureGates: [flowControl, haPopulateNonLeaderDatastore=false]\nplugins: [{type: queue-scorer}]\n").feature_gates
    assert gates["flowControl"] and not gates["haPopulateNonLeaderDatastore"]
    old = load(HEAD + "featureGates: [dataLayer, prepareDataPlugins, enableLegacyMetrics]\nplugins: [{type: queue-scorer}]\n")
    assert len([w for w in old.warnings if "the gate changes nothing" in w]) == 3
    assert "dataLayer cannot be turned off here" in problems(HEAD + "featureGates: [dataLayer=false]\nplugins: [{type: queue-scorer}]\n")
    assert "'maybe' is not a valid value for the feature gate flowControl" in problems(
        HEAD + "featureGates: [flowControl=maybe]\nplugins: [{type: queue-scorer}]\n")


def test_flow_control_section_gate_and_defaults():
    off = load(HEAD + "plugins: [{type: queue-scorer}]\nflowControl: {maxRequests: 10}\n")
    assert off.flow_control is None
    assert any("the flowControl section is set but the flowControl feature gate is off" in w for w in off.warnings)
    on = load(HEAD + """\
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: round-robin-fairness-policy
flowControl:
  maxBytes: 10Gi
  maxRequests: 1k
  defaultRequestTTL: 30s
  noEndpointRequestTTL: 5m
  defaultNegativePriorityBand: {maxRequests: 20}
  priorityBands:
  - {priority: 100, maxRequests: "500", fairnessPolicyRef: round-robin-fairness-policy, orderingPolicyRef: fcfs-ordering-policy}
""")
    fc = on.flow_control
    assert (fc.max_bytes, fc.max_requests, fc.default_ttl, fc.no_endpoint_ttl) == (10 * 2**30, 1000, 30.0, 300.0)
    assert fc.detector.type_name == "utilization-detector" and fc.usage_limit.limit(0) == 1.0
    assert fc.template(100).max_requests == 500 and isinstance(fc.template(100).fairness, RoundRobinFairnessPolicy)
    assert fc.template(-5).max_requests == 20 and fc.template(3).max_requests == 5000
    assert "in-flight eviction is not implemented here" in problems(
        HEAD + "featureGates: [flowControl]\nplugins: [{type: queue-scorer}]\nflowControl: {enableEviction: true}\n")
    assert "priority 7 is configured twice" in problems(
        HEAD + "featureGates: [flowControl]\nplugins: [{type: queue-scorer}]\nflowControl: {priorityBands: [{priority: 7}, {priority: 7}]}\n")


def test_saturation_detector_every_spelling():
    new = load(HEAD + "plugins:\n- type: queue-scorer\n- type: concurrency-detector\n  parameters: {maxConcurrency: 7}\n"
                      "flowControl: {saturationDetector: {pluginRef: concurrency-detector}}\n")
    assert new.saturation_detector.max_concurrency == 7
    old = load(HEAD + "plugins:\n- type: queue-scorer\n- type: concurrency-detector\nsaturationDetector: {pluginRef: concurrency-detector}\n")
    assert old.saturation_detector.type_name == "concurrency-detector"
    assert any("DEPRECATION: top-level saturationDetector" in w for w in old.warnings)
    inline = load("apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins: [{type: queue-scorer}]\n"
                  "saturationDetector: {queueDepthThreshold: 9, kvCacheUtilThreshold: 0.5, metricsStalenessThreshold: 150ms}\n")
    d = inline.saturation_detector
    assert (d.queue_threshold, d.kv_threshold, d.staleness) == (9, 0.5, 0.15)
    default = load(HEAD + "plugins: [{type: queue-scorer}]\n").saturation_detector
    assert (default.type_name, default.queue_threshold, default.kv_threshold, default.staleness) == ("utilization-detector", 5, 0.8, 0.2)
    assert "kvCacheUtilThreshold must be in (0.0, 1.0], got 1.5" in problems(
        HEAD + "plugins:\n- type: utilization-detector\n  parameters: {kvCacheUtilThreshold: 1.5}\n")
    assert "is not a saturation detector" in problems(HEAD + "plugins: [{type: queue-scorer}]\nflowControl: {saturationDetector: {pluginRef: queue-scorer}}\n")


def test_experimental_plugins_need_the_flag():
    text = HEAD + "plugins:\n- type: utilization-filter\n  parameters: {conditions: [{metric: waiting-queue, maxValue: 3}]}\n"
    assert "start the EPP with --allow-experimental-plugins" in problems(text)
    built = load(text, allow_experimental=True)
    assert built.scheduler.describe()["profiles"]["default"]["filters"] == ["utilization-filter"]


def test_non_scheduling_plugins_in_a_profile_are_skipped_with_a_warning():
    built = load(HEAD + "plugins:\n- type: openai-parser\n- type: queue-scorer\nschedulingProfiles:\n- name: default\n  plugins:\n"
                        "  - pluginRef: openai-parser\n  - pluginRef: queue-scorer\n")
    assert any("listing it in a scheduling profile has no effect" in w for w in built.warnings)
    assert built.scheduler.describe()["profiles"]["default"]["scorers"] == [{"name": "queue-scorer", "weight": 1.0}]


def test_config_errors_carry_each_problem():
    with pytest.raises(ConfigErrors) as e:
        load(HEAD + "plugins:\n- type: a-b\n- type: c-d\n")
    assert len(e.value.problems) == 2
