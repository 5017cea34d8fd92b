"""Pair-aware predicted latency and the cost-based disaggregation decision, on the seed's two-worker fabric."""

import pytest

from epp.scheduling.framework import ConfigError, CycleState
from tests.disagg.conftest import Built, request, seed_cluster
from tests.disagg.test_links import write_links

PAIRED = """
plugins:
- type: kv-link-profiles
  parameters: {{file: {file}}}
- type: prefill-filter
- type: decode-filter
- type: pd-pair-latency-scorer
  parameters: {{defaultPrefillTokensPerSecond: 10000, defaultDecodeSecondsPerToken: 0.01, batchSlowdown: 0.05{extra}}}
- type: cost-based-pd-decider
  parameters: {{{decider}}}
- type: disagg-profile-handler
  parameters: {{deciders: {{prefill: cost-based-pd-decider}}}}
schedulingProfiles:
- name: prefill
  plugins: [{{pluginRef: prefill-filter}}, {{pluginRef: pd-pair-latency-scorer}}]
- name: decode
  plugins: [{{pluginRef: decode-filter}}, {{pluginRef: pd-pair-latency-scorer}}]
"""


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def paired(tmp_path):
    def make(endpoints=None, extra="", decider=""):
        b = Built(PAIRED.format(file=write_links(tmp_path), extra=extra, decider=decider), endpoints or seed_cluster())
        b.clock = Clock()
        b.model = b.plugins["pd-pair-latency-scorer"].pair_model
        b.model.clock = b.clock
        return b

    return make


def only(names):
    return [e for e in seed_cluster() if e.name in names]


def test_idle_decode_prefills_locally_busy_decode_disaggregates_over_nvlink(paired):
    b = paired(only({"prefill-a", "decode-a"}))
    first = b.route(request(8000, "first", max_tokens=200))
    # idle decode pod: the prefill costs the same here or there, the transfer is extra
    assert first.request_headers == {}
    note = first.notes["disaggregation"]["prefill_decider"]
    assert note["disaggregate"] is False and "cheaper than the best pair (prefill-a)" in note["reason"]
    assert note["local"]["ttft_ms"] == pytest.approx(810, abs=1) and note["pairs"]["prefill-a"]["link"] == "class:host/nvlink"
    for i in range(3):  # three more requests decoding on decode-a
        b.route(request(100, f"bg{i}", max_tokens=500))
    b.clock.t += 1.0
    second = b.route(request(8000, "second", max_tokens=200))
    # now a local prefill would stall 4 decoding requests for ~0.8 s each; the NVLink pair costs ~2.5 ms of transfer
    assert second.request_headers == {"x-prefiller-host-port": "10.0.1.1:8000"}
    d = second.notes["disaggregation"]
    assert d["decision"] == "prefill-decode" and d["prefill_decider"]["best_pair"] == "prefill-a"
    assert d["prefill_decider"]["gain_ms"] > 2000


def test_measured_fabric_beats_topology_affinity(paired):
    """worker-b's intra-node path (PCIe/shared storage) is slower than Ethernet to worker-a's prefill pod."""
    b = paired(only({"prefill-a", "prefill-b", "decode-b"}), decider="minGain: 0ms")
    for i in range(4):
        b.route(request(100, f"bg{i}", max_tokens=500))
    r = b.route(request(8000, "long", max_tokens=100))
    assert r.targets[0].name == "decode-b"
    assert r.request_headers == {"x-prefiller-host-port": "10.0.1.1:8000"}  # prefill-a, across the workers
    pairs = r.notes["disaggregation"]["prefill_decider"]["pairs"]
    assert pairs["prefill-a"]["link"] == "class:none" and pairs["prefill-b"]["link"] == "class:host/fs"
    assert pairs["prefill-b"]["transfer_ms"] > 5 * pairs["prefill-a"]["transfer_ms"]
    prefill_stage = r.notes["pd-pair-latency-scorer"]["prefill"]["routes"]
    assert list(prefill_stage) == ["prefill-a", "prefill-b"]  # ranked by predicted cost


def test_decode_stage_scores_each_decode_pod_by_its_best_route(paired):
    b = paired()
    for d in ("decode-a", "decode-b"):  # equally busy decode pods: a local prefill would stall either
        for i in range(4):
            b.model.book(request(100, f"{d}-{i}", max_tokens=500), None, b.endpoint(d))
    r = b.route(request(16000, "long", max_tokens=50))
    decode_stage = r.notes["pd-pair-latency-scorer"]["decode"]["routes"]
    assert r.targets[0].name == "decode-a"  # its best route is the NVLink pair; decode-b's crosses Ethernet
    assert decode_stage["decode-a"]["via"] == "prefill-a -> decode-a"
    assert decode_stage["decode-b"]["via"] == "prefill-a -> decode-b"
    assert decode_stage["decode-a"]["cost_ms"] < decode_stage["decode-b"]["cost_ms"]


def test_prefill_queue_moves_the_next_prefill_to_the_other_pod(paired):
    b = paired(only({"prefill-a", "prefill-b", "decode-a"}))
    for i in range(4):
        b.route(request(100, f"bg{i}", max_tokens=500))
    picks = []
    for i in range(3):
        r = b.route(request(8000, f"long{i}", max_tokens=50))
        picks.append(r.request_headers.get("x-prefiller-host-port"))
    # the first goes over NVLink; prefill-a is then busy for 0.8 s, so the next waits less on prefill-b over Ethernet
    assert picks[0] == "10.0.1.1:8000" and "10.0.2.1:8000" in picks[1:]


def test_bookings_are_released_and_calibration_learns_per_route(paired):
    b = paired(only({"prefill-a", "decode-a"}))
    reqs = [request(100, f"bg{i}", max_tokens=500) for i in range(4)]
    results = [b.route(r) for r in reqs]
    long = request(8000, "long", max_tokens=10)
    res = b.route(long)
    assert res.request_headers and b.model.booked() == 5
    b.clock.t += 5.0  # observed 5 s against a prediction of ~1 s: this link is slower than its profile says
    b.done(long, res)
    assert b.model.calibration("prefill-a->decode-a") > 1.2
    b.clock.t += 60.0  # unused for a half-life: half-way back to 1
    assert b.model.calibration("prefill-a->decode-a") == pytest.approx(1 + (b.model._calibration["prefill-a->decode-a"][0] - 1) / 2)
    for r, out in zip(reqs, results):
        b.done(r, out, "cancelled")
    assert b.model.booked() == 0 and b.model._stage == {} and b.model._seats == {}


def test_a_degraded_link_loses_traffic_as_requests_finish_and_regains_it_after_recovery(paired):
    """The profile still says NVLink; outcomes say otherwise: calibration moves the pair off it, and back."""
    b = paired(only({"prefill-a", "prefill-b", "decode-a"}), extra=", calibrationHalfLife: 5s")

    def run(n, slow_link):
        picks = []
        for i in range(n):
            bg = [request(100, f"bg{i}-{j}", max_tokens=500) for j in range(4)]
            bg_results = [b.route(r) for r in bg]
            r = request(4000, f"long{i}", max_tokens=10)
            res = b.route(r)
            via = res.request_headers.get("x-prefiller-host-port")
            picks.append(via)
            # the world: every request takes what the model predicted, except over the degraded link (3×)
            predicted = b.model._bookings[id(r)].predicted
            b.clock.t += predicted * (3.0 if slow_link and via == "10.0.1.1:8000" else 1.0)
            b.done(r, res)
            for q, out in zip(bg, bg_results):  # background load: its timing is not part of this world
                b.done(q, out, "cancelled")
        return picks

    degraded = run(20, slow_link=True)
    assert degraded[0] == "10.0.1.1:8000" and degraded[-5:] == ["10.0.2.1:8000"] * 5, degraded
    recovered = run(40, slow_link=False)
    assert recovered[-5:] == ["10.0.1.1:8000"] * 5, recovered


def test_without_any_link_data_pairs_fall_back_to_load(tmp_path):
    b = Built(PAIRED.replace("- type: kv-link-profiles\n  parameters: {{file: {file}}}\n", "").format(extra="", decider=""),
              only({"prefill-a", "prefill-b", "decode-a"}))
    for i in range(4):
        b.route(request(100, f"bg{i}", max_tokens=500))
    first = b.route(request(8000, "a"))
    second = b.route(request(8000, "b"))
    assert first.request_headers and second.request_headers
    assert first.request_headers != second.request_headers  # the booked prefill queue spreads them
    assert first.notes["disaggregation"]["prefill_decider"]["pairs"]["prefill-a"]["link"] == "no-profile"


def test_max_transfer_time_excludes_slow_links_from_the_choice(paired):
    b = paired(only({"prefill-b", "decode-b"}), extra=", maxTransferTime: 50ms")
    for i in range(4):
        b.route(request(100, f"bg{i}", max_tokens=500))
    r = b.route(request(8000, "long"))
    assert r.request_headers == {}
    assert "no prefill candidate within maxTransferTime" in r.notes["disaggregation"]["prefill_decider"]["reason"]


def test_decider_owns_a_model_when_no_scorer_is_configured(tmp_path):
    text = """
    plugins:
    - type: prefill-filter
    - type: decode-filter
    - type: cost-based-pd-decider
      parameters: {prefillInterference: 2}
    - type: disagg-profile-handler
      parameters: {deciders: {prefill: cost-based-pd-decider}}
    schedulingProfiles:
    - {name: prefill, plugins: [{pluginRef: prefill-filter}]}
    - {name: decode, plugins: [{pluginRef: decode-filter}]}
    """
    b = Built(text, only({"prefill-a", "decode-a"}))
    decider = b.plugins["cost-based-pd-decider"]
    assert decider.owns_model and decider.model.prefill_interference == 2
    reqs = [request(100, f"bg{i}", max_tokens=500) for i in range(3)]
    outs = [b.route(r) for r in reqs]
    assert decider.model.booked() == 3
    for r, o in zip(reqs, outs):
        b.done(r, o)
    assert decider.model.booked() == 0


def test_config_errors(paired):
    with pytest.raises(ConfigError, match="pairScorer 'x' is not a configured pd-pair-latency-scorer"):
        paired(decider="pairScorer: x")
    with pytest.raises(ConfigError, match="either here or on pairScorer"):
        paired(decider="pairScorer: pd-pair-latency-scorer, batchSlowdown: 0.1")
    with pytest.raises(ConfigError, match="speed: unknown parameter"):
        paired(extra=", speed: 3")
    with pytest.raises(ConfigError, match="localPrefill must be true or false"):
        paired(extra=", localPrefill: 3")


def test_single_profile_use_scores_local_routes_only(tmp_path):
    text = """
    plugins:
    - type: pd-pair-latency-scorer
    schedulingProfiles:
    - {name: default, plugins: [{pluginRef: pd-pair-latency-scorer}]}
    """
    b = Built(text, only({"decode-a", "decode-b"}))
    s = b.plugins["pd-pair-latency-scorer"]
    state = CycleState(b.datastore.endpoints())
    routes = s.routes(state, request(100), list(b.datastore.endpoints()))
    assert all(not r.remote for r in routes)


def test_best_pair_search_agrees_with_the_exhaustive_one(paired):
    """The pruned search returns the cheapest pair, whatever the bookings and calibrations."""
    import random

    rng = random.Random(3)
    b = paired()
    e = {x.name: x for x in b.datastore.endpoints()}
    prefills = [e["prefill-a"], e["prefill-b"]]
    for trial in range(40):
        for i in range(rng.randrange(4)):
            b.model.book(request(rng.randrange(10, 4000), f"t{trial}-{i}", max_tokens=200), rng.choice(prefills + [None]),
                         rng.choice([e["decode-a"], e["decode-b"]]))
        for route in ("prefill-a->decode-a", "prefill-b->decode-a", "prefill-a->decode-b", "decode-b"):
            b.model._calibration[route] = (rng.uniform(0.5, 3.0), b.clock.t)
        state, req = CycleState(b.datastore.endpoints()), request(rng.randrange(10, 16000), f"q{trial}")
        for d in (e["decode-a"], e["decode-b"]):
            fast = b.model.best_pair_into(state, req, d, prefills)
            full = min(b.model.pairs(state, req, d, prefills), key=lambda r: r.cost)
            assert fast.route == full.route and fast.cost == pytest.approx(full.cost)


def test_prefill_first_scores_prefill_pods_by_their_best_decode_then_decode_by_the_link(tmp_path):
    text = PAIRED.format(file=write_links(tmp_path), extra="", decider="").replace(
        "parameters: {{deciders: {{prefill: cost-based-pd-decider}}}}".format(), "parameters: {stageOrder: prefill-first}")
    text = text.replace("- type: cost-based-pd-decider\n  parameters: {}\n", "")
    b = Built(text, only({"prefill-a", "prefill-b", "decode-b"}))
    r = b.route(request(8000, "long", max_tokens=50))
    notes = r.notes["pd-pair-latency-scorer"]
    assert r.request_headers == {"x-prefiller-host-port": "10.0.1.1:8000"}  # prefill-a: Ethernet beats worker-b's fs path
    assert notes["prefill"]["routes"]["prefill-a"]["via"] == "prefill-a -> decode-b"
    assert notes["decode"]["routes"]["decode-b"]["link"] == "class:none"
