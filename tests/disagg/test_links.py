"""Per-link KV-transfer profiles: where they come from, how a pair finds its own, the file and its reloads."""

import json
import os
import time

import pytest

from epp.datastore.endpoint import EndpointMetrics, TransferProfile
from epp.datastore.links import LinkProfileError, LinkProfiles, load_link_profiles
from epp.scheduling.framework import PEER_ENDPOINT_KEY, STAGE_KEY, ConfigError, CycleState
from epp.scrape.parse import parse_metrics
from tests.disagg.conftest import Built, request, seed_cluster


def points(*pairs):
    return [{"blocks": b, "seconds": s} for b, s in pairs]


SEED_LINKS = {
    "schema": "inference-epp/kv-link-profiles/v1",
    "block_tokens": 16,
    "classes": [
        {"level": "host", "match_kv_backend": "nvlink", "kv_backend": "nvlink", "points": points((1, 0.0001), (1024, 0.005))},
        {"level": "host", "match_kv_backend": "fs", "kv_backend": "fs", "points": points((1, 0.005), (1024, 0.8))},
        {"level": "none", "kv_backend": "ethernet", "points": points((1, 0.001), (1024, 0.06))},
    ],
}


def write_links(tmp_path, doc=SEED_LINKS, name="links.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def by_name(eps):
    return {e.name: e for e in eps}


def test_class_profiles_follow_topology_and_fabric(tmp_path):
    links = LinkProfiles()
    links.replace(load_link_profiles(write_links(tmp_path)))
    e = by_name(seed_cluster())
    assert links.level(e["prefill-a"], e["decode-a"]) == "host" and links.level(e["prefill-a"], e["decode-b"]) == "none"
    fast, src = links.transfer_seconds(e["prefill-a"], e["decode-a"], 1024 * 16)
    assert (round(fast, 4), src) == (0.005, "class:host/nvlink")
    slow, src = links.transfer_seconds(e["prefill-b"], e["decode-b"], 1024 * 16)
    assert (round(slow, 3), src) == (0.8, "class:host/fs")
    cross, src = links.transfer_seconds(e["prefill-b"], e["decode-a"], 1024 * 16)
    assert (round(cross, 3), src) == (0.06, "class:none")


def test_lookup_order_live_then_pair_then_class_then_endpoint(tmp_path):
    e = by_name(seed_cluster())
    p, d = e["prefill-b"], e["decode-a"]
    doc = dict(SEED_LINKS, links=[{"prefill": "prefill-b", "decode": "10.0.1.2:8000", "points": points((1, 0.002), (64, 0.02))}])
    links = LinkProfiles()
    links.replace(load_link_profiles(write_links(tmp_path, doc)))
    assert links.lookup(p, d)[1] == "pair"  # endpoints may be named by name or ip:port
    d.metrics = EndpointMetrics(link_profiles={p.hostport: TransferProfile((1,), (0.5,))})
    assert links.lookup(p, d)[1] == "live"
    d.metrics = EndpointMetrics(transfer_profile=TransferProfile((1,), (0.3,)))
    assert links.lookup(p, d)[1] == "pair"
    empty = LinkProfiles()
    assert empty.lookup(p, d)[1] == "endpoint"
    d.metrics = EndpointMetrics()
    assert empty.transfer_seconds(p, d, 100) == (None, "")  # no data: no estimate, never an error


def test_custom_topology_labels(tmp_path):
    e = by_name(seed_cluster())
    links = LinkProfiles({"host": "node", "rack": "rack"})
    e["prefill-a"].labels = {**e["prefill-a"].labels, "rack": "r1"}
    e["decode-b"].labels = {**e["decode-b"].labels, "rack": "r1"}
    assert links.level(e["prefill-a"], e["decode-b"]) == "rack"
    assert links.level(e["prefill-a"], e["decode-a"]) == "none"  # kubernetes.io/hostname is not the host label here


@pytest.mark.parametrize("doc, fragment", [
    ({"schema": "other"}, "schema 'other'"),
    ({"links": [{"prefill": "a"}]}, "links[0]: needs 'prefill' and 'decode'"),
    ({"classes": [{"level": "continent", "points": points((1, 1.0))}]}, "classes[0]: level must be one of"),
    ({"classes": [{"level": "host", "points": points((4, 1.0), (2, 2.0))}]}, "classes[0].points[1].blocks must increase"),
    ({"classes": [{"level": "host", "points": points((4, -1.0))}]}, "points[0].seconds must be a number >= 0"),
    ({"links": [], "extra": 1}, "unknown field(s) extra"),
])
def test_bad_files_name_the_entry(tmp_path, doc, fragment):
    with pytest.raises(LinkProfileError) as e:
        load_link_profiles(write_links(tmp_path, doc))
    assert fragment in str(e.value)


def test_file_reload_keeps_last_good_table(tmp_path):
    path = write_links(tmp_path)
    links = LinkProfiles()
    links.watch_file(str(path), 0.01)
    e = by_name(seed_cluster())
    assert links.transfer_seconds(e["prefill-a"], e["decode-b"], 16)[1] == "class:none"
    path.write_text("{not json")
    os.utime(path, (time.time() + 5, time.time() + 5))
    time.sleep(0.02)
    assert links.transfer_seconds(e["prefill-a"], e["decode-b"], 16)[1] == "class:none"  # broken edit: last good kept
    degraded = dict(SEED_LINKS, classes=[{"level": "none", "points": points((1, 2.0))}])
    path.write_text(json.dumps(degraded))
    os.utime(path, (time.time() + 10, time.time() + 10))
    time.sleep(0.02)
    assert links.transfer_seconds(e["prefill-a"], e["decode-b"], 16) == (2.0, "class:none")


def test_sidecar_metrics_carry_one_profile_per_prefill_peer():
    text = """
# TYPE pdproxy_kv_transfer_profile_seconds gauge
pdproxy_kv_transfer_profile_seconds{blocks="1",kv_backend="nvlink",prefill="10.0.1.1:8000"} 0.0002
pdproxy_kv_transfer_profile_seconds{blocks="64",kv_backend="nvlink",prefill="10.0.1.1:8000"} 0.002
pdproxy_kv_transfer_profile_seconds{blocks="1",kv_backend="ethernet",prefill="10.0.2.1:8000"} 0.001
pdproxy_kv_transfer_profile_seconds{blocks="64",kv_backend="ethernet",prefill="10.0.2.1:8000"} 0.03
# TYPE pdproxy_kv_block_tokens gauge
pdproxy_kv_block_tokens 16
"""
    m = parse_metrics(text)
    assert m.transfer_profile is None
    assert set(m.link_profiles) == {"10.0.1.1:8000", "10.0.2.1:8000"}
    prof = m.link_profiles["10.0.2.1:8000"]
    assert (prof.blocks, prof.seconds, prof.backend, prof.block_tokens) == ((1, 64), (0.001, 0.03), "ethernet", 16)


GUARDED = """
plugins:
- type: kv-link-profiles
  parameters: {{file: {file}, reloadInterval: 1s}}
- type: prefill-filter
- type: decode-filter
- type: transfer-time-filter
  parameters: {{maxTransferTime: 100ms}}
- type: always-disagg-pd-decider
- type: disagg-profile-handler
  parameters: {{deciders: {{prefill: always-disagg-pd-decider}}}}
schedulingProfiles:
- name: prefill
  plugins: [{{pluginRef: prefill-filter}}, {{pluginRef: transfer-time-filter}}]
- name: decode
  plugins: [{{pluginRef: decode-filter}}]
"""


def test_guardrail_drops_slow_links_and_falls_back_to_decode_only(tmp_path):
    eps = [e for e in seed_cluster() if e.name in ("prefill-b", "decode-b")]  # only the slow fs pair
    b = Built(GUARDED.format(file=write_links(tmp_path)), eps)
    small = b.route(request(64))  # 4 blocks over fs: a few ms
    assert small.request_headers == {"x-prefiller-host-port": "10.0.2.1:8000"}
    big = b.route(request(8000))  # 500 blocks over fs: ~0.4 s > 100 ms
    assert big.request_headers == {}
    assert big.notes["disaggregation"]["decision"] == "decode-only"
    assert "transfer-time-filter" in big.notes["disaggregation"]["prefill_failed"]
    assert big.notes["transfer-time-filter"]["over_max_ms"] == {"prefill-b": pytest.approx(392.2, abs=1)}


def test_guardrail_in_decode_stage_keeps_all_rather_than_fail(tmp_path):
    links = LinkProfiles()
    links.replace(load_link_profiles(write_links(tmp_path)))
    from filters.transfer_time import TransferTimeFilter

    f = TransferTimeFilter("g", 0.05, links)
    e = by_name(seed_cluster())
    state = CycleState()
    state.write(STAGE_KEY, "decode")
    state.write(PEER_ENDPOINT_KEY, e["prefill-b"])
    kept = f.filter(state, request(16000), [e["decode-b"]])  # fs link at ~0.8 s, the only decode pod
    assert kept == [e["decode-b"]] and state.notes["g"]["kept_all"]
    state = CycleState()
    state.write(STAGE_KEY, "prefill")
    state.write(PEER_ENDPOINT_KEY, e["decode-a"])
    assert f.filter(state, request(16000), [e["prefill-a"], e["prefill-b"]]) == [e["prefill-a"]]


def test_link_profiles_plugin_missing_file_is_no_data_and_errors_are_named(tmp_path, monkeypatch):
    missing = tmp_path / "later.json"
    monkeypatch.setenv("EPP_KV_LINK_PROFILES", str(missing))
    b = Built("plugins:\n- type: kv-link-profiles\n  parameters: {reloadInterval: 10ms}\n- type: decode-filter\n", [])
    links = b.datastore.links
    assert len(links.table) == 0  # not written yet: no data, no error
    write_links(tmp_path, name="later.json")
    time.sleep(0.02)
    assert len(links.table) == 3
    with pytest.raises(ConfigError, match="file must be the path"):
        Built("plugins:\n- type: kv-link-profiles\n  parameters: {file: 3}\n- type: decode-filter\n", [])
    bad = tmp_path / "bad.json"
    bad.write_text('{"classes": [{"level": "host"}]}')
    with pytest.raises(ConfigError, match="classes.0.: points must be a non-empty list"):
        Built(f"plugins:\n- type: kv-link-profiles\n  parameters: {{file: {bad}}}\n- type: decode-filter\n", [])
    with pytest.raises(ConfigError, match="topologyLabels maps hostname"):
        Built(f"plugins:\n- type: kv-link-profiles\n  parameters: {{file: {write_links(tmp_path)}, topologyLabels: {{node: x}}}}\n"
              "- type: decode-filter\n", [])


def test_llm_d_topology_affinity_curve_and_fail_open_filter():
    from filters.topology_affinity import TopologyAffinityFilter
    from scorers.topology_affinity import TopologyAffinityScorer

    e = by_name(seed_cluster())
    links = LinkProfiles()
    scorer, flt = TopologyAffinityScorer("s", links), TopologyAffinityFilter("f", links, "host")
    state = CycleState()
    prefills = [e["prefill-a"], e["prefill-b"]]
    assert scorer.score(state, request(10), prefills) == [0.0, 0.0]  # no peer yet
    state.write(PEER_ENDPOINT_KEY, e["decode-a"])
    assert scorer.score(state, request(10), prefills) == [1.0, 0.0]  # same host 1.0, nothing shared 0
    assert flt.filter(state, request(10), prefills) == [e["prefill-a"]]
    assert flt.filter(state, request(10), [e["prefill-b"]]) == [e["prefill-b"]]  # none close enough: keeps all
    e["decode-a"].labels = {k: v for k, v in e["decode-a"].labels.items() if k != "kubernetes.io/hostname"}
    assert flt.filter(state, request(10), prefills) == prefills  # peer without topology: keeps all
    with pytest.raises(ConfigError, match="invalid topology level 'none'"):
        Built("plugins:\n- type: topology-affinity-filter\n  parameters: {minAffinity: none}\n", [])
