"""A backend that fails at once must not look idle (active-request) nor fast (predicted-latency)."""

import random

import pytest

from epp.datastore import Datastore, Endpoint
from epp.scheduling import registry
from epp.scheduling.framework import ConfigError, CycleState, LLMRequest, ProfileRunResult, SchedulingResult
from epp.scheduling.registry import PluginContext


def ep(name):
    return Endpoint(name=name, address="10.0.0.1", port=8000 + len(name))


def req(tokens=400):
    return LLMRequest(request_id="r", model="m", target_model="m", api="completions", prompt_tokens=tokens, max_tokens=32)


def result_for(target):
    return SchedulingResult("default", {"default": ProfileRunResult("default", [target], [target])})


def make(type_name, params=None):
    return registry.create(type_name, type_name, params or {}, PluginContext(datastore=Datastore(), services={"rng": random.Random(1)}))


def test_active_request_holds_a_failed_requests_slot_for_the_failure_penalty():
    clock = [0.0]
    s = make("active-request-scorer", {"failurePenalty": "2s"})
    s.clock = lambda: clock[0]
    dead, ok = ep("dead"), ep("ok")
    for _ in range(3):  # three requests failed in a millisecond on `dead`
        r = req()
        s.pre_request(r, result_for(dead))
        s.response_complete(r, None, "error")
    busy = req()
    s.pre_request(busy, result_for(ok))  # one still running on `ok`
    assert s.score(CycleState(), req(), [dead, ok]) == [0.0, pytest.approx(2 / 3)]  # dead counts 3, ok 1
    clock[0] += 2.1
    assert s.score(CycleState(), req(), [dead, ok]) == [1.0, 0.0]  # penalties over
    assert s.counts == {"ok": 1}


def test_active_request_releases_at_once_for_client_errors_and_disconnects():
    s = make("active-request-scorer")
    a = ep("a")
    for outcome in ("client_error", "cancelled", "success", "timeout"):
        r = req()
        s.pre_request(r, result_for(a))
        s.response_complete(r, None, outcome)
    assert s.counts == {}
    assert make("active-request-scorer", {"failurePenalty": 0}).failure_penalty == 0.0
    with pytest.raises(ConfigError, match="failurePenalty"):
        make("active-request-scorer", {"failurePenalty": "-1s"})


def test_predicted_latency_learns_only_from_successes_and_a_failure_counts_against():
    clock = [100.0]
    s = make("predicted-latency-scorer")
    s.clock = lambda: clock[0]
    dead, ok = ep("dead"), ep("ok")
    base = s.score(CycleState(), req(), [dead, ok])
    assert base == [1.0, 1.0]
    for _ in range(3):  # fails 1 ms after routing: as a success this would calibrate it to the floor (fastest)
        r = req()
        s.pre_request(r, result_for(dead))
        clock[0] += 0.001
        s.response_complete(r, None, "error")
    assert s.calibration["dead"] == pytest.approx(1 + (3 - 1) * (1 - 0.7 ** 3))  # pulled toward 3.0
    st = CycleState()
    scores = s.score(st, req(), [dead, ok])
    assert scores[1] == 1.0 and scores[0] < 0.5
    # the failed bookings still load it until their predicted end, then go
    assert len(s._flights["dead"]) == 3 and st.read("predicted-latency")["dead"]["wait"] > 0
    clock[0] += 5.0
    s.score(CycleState(), req(), [dead, ok])
    assert s._flights["dead"] == {} and s._held == []
    # a success far faster than predicted moves it down slowly; a disconnect or 4xx teaches nothing
    before = s.calibration["dead"]
    for outcome in ("cancelled", "client_error"):
        r = req()
        s.pre_request(r, result_for(dead))
        s.response_complete(r, None, outcome)
    assert s.calibration["dead"] == before and s._flights["dead"] == {}


def test_predicted_latency_forgets_held_bookings_of_a_removed_endpoint():
    s = make("predicted-latency-scorer")
    dead = ep("dead")
    r = req()
    s.pre_request(r, result_for(dead))
    s.response_complete(r, None, "error")
    assert len(s._held) == 1
    s.forget_endpoint(dead)
    assert s._held == [] and "dead" not in s._flights


def test_pair_latency_routes_learn_only_from_successes(tmp_path):
    """The P/D pair model (pd-pair-latency-scorer, cost-based decider): a failed request keeps its seat, its route slows."""
    from tests.disagg.conftest import Built, request, seed_cluster
    from tests.disagg.test_links import write_links
    from tests.disagg.test_pair_latency import PAIRED

    b = Built(PAIRED.format(file=write_links(tmp_path), extra="", decider=""), [e for e in seed_cluster() if e.name in ("prefill-a", "decode-a")])
    model = b.plugins["pd-pair-latency-scorer"].pair_model
    clock = [1000.0]
    model.clock = lambda: clock[0]
    failed = []
    for i in range(3):  # each fails a millisecond after it was routed
        r = request(2000, f"f{i}", max_tokens=200)
        result = b.route(r)
        clock[0] += 0.001
        b.done(r, result, "error")
        failed.append(result)
    routes = model._calibration  # route -> (calibration, when): each failure pulled its route 30% of the way to 3
    assert routes and all(value >= 1.6 - 1e-9 for value, _ in routes.values())
    assert model.booked() == 0 and sum(len(v) for v in model._seats.values()) == 3  # released, but the seats stay
    clock[0] += 60.0
    b.route(request(100, "later", max_tokens=4))
    assert sum(len(v) for v in model._seats.values()) == 1  # the held ones are gone once their predicted end passed
    r = request(100, "ok", max_tokens=4)
    result = b.route(r)
    b.done(r, result, "client_error")
    assert model.booked() == 1 and all(model.calibration(route) < 3.0 for route in routes)
