"""Endpoint health's rules, driven with a fake clock: Envoy's outlier detection, readiness, half-open, panic, the watchdog."""

import random

import pytest

from epp.datastore import Endpoint
from epp.endpoint_health import HealthMonitor, HealthPolicy, OutlierPolicy, ReadinessPolicy, parse_policy
from epp.endpoint_health import outcomes as oc
from epp.endpoint_health.readiness import Verdict
from epp.scheduling.framework import ConfigError, LLMRequest, ProfileRunResult, SchedulingResult


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def eps(n):
    return [Endpoint(name=f"e{i}", address="127.0.0.1", port=9000 + i) for i in range(n)]


def monitor(n=2, clock=None, **outlier):
    policy = HealthPolicy(outlier=OutlierPolicy(**{"max_ejection_percent": 50, "base_ejection_time": 10.0, **outlier}))
    m = HealthMonitor(policy=policy, clock=clock or Clock(), rng=random.Random(1))
    endpoints = eps(n)
    m._pool_size = lambda: n
    return m, endpoints


def keys(admission):
    return [e.key for e in admission.endpoints]


def test_consecutive_gateway_failures_eject_and_the_reason_is_given():
    clock = Clock()
    m, (a, b) = monitor(clock=clock)
    m.record(a, oc.GATEWAY_FAILURE, detail="status 503")
    assert keys(m.admit([a, b])) == ["e0", "e1"]  # one is not enough (threshold 2)
    m.record(a, oc.GATEWAY_FAILURE, detail="status 503")
    adm = m.admit([a, b])
    assert keys(adm) == ["e1"] and not adm.panic
    assert adm.excluded["e0"].startswith("ejected: 2 gateway failures in a row (gateway_failure: status 503), 10.0s left")
    snap = m.snapshot("e0")
    assert snap["state"] == "ejected" and snap["ejections"] == {"consecutive_gateway_failure": 1}


def test_a_success_or_a_4xx_resets_the_run_and_a_500_breaks_a_gateway_run():
    m, (a, b) = monitor(consecutive_5xx=3)
    for kind in (oc.GATEWAY_FAILURE, oc.SUCCESS, oc.GATEWAY_FAILURE, oc.CLIENT_ERROR, oc.GATEWAY_FAILURE, oc.HTTP_5XX):
        m.record(a, kind)
    assert keys(m.admit([a, b])) == ["e0", "e1"]
    assert m.snapshot("e0")["consecutive_5xx"] == 2 and m.snapshot("e0")["consecutive_gateway_failures"] == 0
    m.record(a, oc.HTTP_5XX)  # third 5xx in a row
    assert keys(m.admit([a, b])) == ["e1"]
    assert m.snapshot("e0")["ejections"] == {"consecutive_5xx": 1}


def test_neutral_ends_are_not_held_against_the_endpoint():
    m, (a, b) = monitor(consecutive_gateway_failure=1)
    for kind in (oc.ABORTED, oc.RESET, oc.CLIENT_ERROR, oc.EXPIRED, oc.INTERNAL):
        m.record(a, kind)
    assert keys(m.admit([a, b])) == ["e0", "e1"]


def test_ejection_ends_half_open_one_trial_at_a_time_then_readmitted():
    clock = Clock()
    m, (a, b) = monitor(clock=clock, consecutive_gateway_failure=1)
    m.record(a, oc.GATEWAY_FAILURE)
    clock.t += 10.1
    assert keys(m.admit([a, b])) == ["e0", "e1"]  # ejection over: half-open, the next request is a trial
    assert m.snapshot("e0")["state"] == "half_open"
    m.scheduled(1, a)
    adm = m.admit([a, b])
    assert keys(adm) == ["e1"] and adm.excluded["e0"] == "half-open: trial request in flight"
    m.record(a, oc.SUCCESS, 1, ttfb=0.05)
    assert keys(m.admit([a, b])) == ["e0", "e1"] and m.snapshot("e0")["state"] == "healthy"
    assert m.snapshot("e0")["ttfb_seconds"] == 0.05


def test_a_failed_trial_ejects_again_for_longer_and_the_multiplier_decays():
    clock = Clock()
    m, (a, b) = monitor(clock=clock, consecutive_gateway_failure=1, max_ejection_time=25.0)
    m.record(a, oc.GATEWAY_FAILURE)
    clock.t += 10.1
    m.admit([a, b])
    m.scheduled(7, a)
    m.record(a, oc.FIRST_BYTE_TIMEOUT, 7)
    snap = m.snapshot("e0")
    assert snap["state"] == "ejected" and snap["ejection_reason"] == "half_open_trial_failed" and snap["ejected_for_seconds"] == 20.0
    clock.t += 20.1
    m.admit([a, b])
    m.scheduled(8, a)
    m.record(a, oc.HTTP_5XX, 8)
    assert m.snapshot("e0")["ejected_for_seconds"] == 25.0  # 3 × 10 s, capped at maxEjectionTime
    clock.t += 25.1
    m.admit([a, b])
    m.record(a, oc.SUCCESS)
    assert m.snapshot("e0")["multiplier"] == 3
    m.evaluate()  # failures in this interval: no decay
    assert m.snapshot("e0")["multiplier"] == 3
    m.evaluate()
    m.evaluate()  # two clean intervals
    assert m.snapshot("e0")["multiplier"] == 1


def test_a_late_failure_of_a_request_routed_before_half_open_does_not_fail_the_trial():
    clock = Clock()
    m, (a, b) = monitor(clock=clock, consecutive_gateway_failure=1)
    old_request_routed = clock.t
    m.record(a, oc.GATEWAY_FAILURE)
    clock.t += 11
    m.admit([a, b])  # half-open now
    m.record(a, oc.FIRST_BYTE_TIMEOUT, 99, routed_at=old_request_routed)  # the watchdog on a request from before the ejection
    assert m.snapshot("e0")["state"] == "half_open"
    m.record(a, oc.GATEWAY_FAILURE, 100, routed_at=clock.t)
    assert m.snapshot("e0")["state"] == "ejected"


def test_a_neutral_trial_end_frees_the_trial_slot():
    clock = Clock()
    m, (a, b) = monitor(clock=clock, consecutive_gateway_failure=1)
    m.record(a, oc.GATEWAY_FAILURE)
    clock.t += 11
    m.admit([a, b])
    m.scheduled(3, a)
    m.record(a, oc.ABORTED, 3)
    assert keys(m.admit([a, b])) == ["e0", "e1"] and m.snapshot("e0")["state"] == "half_open"


def test_max_ejection_percent_keeps_at_least_the_rest_in():
    m, (a, b) = monitor(consecutive_gateway_failure=1, max_ejection_percent=10)
    m.record(a, oc.GATEWAY_FAILURE)  # one endpoint may always be ejected
    m.record(b, oc.GATEWAY_FAILURE)  # a second would be 100% > 10%
    assert keys(m.admit([a, b])) == ["e1"]


def test_enforcing_zero_never_ejects():
    m, (a, b) = monitor(consecutive_gateway_failure=1, enforcing_consecutive_gateway_failure=0)
    for _ in range(5):
        m.record(a, oc.GATEWAY_FAILURE)
    assert keys(m.admit([a, b])) == ["e0", "e1"]


def test_success_rate_and_failure_percentage_sweeps():
    m, endpoints = monitor(n=6, success_rate_request_volume=10, success_rate_minimum_hosts=5, consecutive_5xx=1000,
                           consecutive_gateway_failure=1000, failure_percentage_minimum_hosts=100)
    for e in endpoints:
        for i in range(20):
            bad = e.key == "e3" and i % 2 == 0
            m.record(e, oc.HTTP_5XX if bad else oc.SUCCESS)
    m.evaluate()
    assert keys(m.admit(endpoints)) == ["e0", "e1", "e2", "e4", "e5"]
    assert m.snapshot("e3")["ejections"] == {"success_rate": 1}
    # failure percentage (off by default: enforcing 0) — on, any endpoint at ≥ 85% failures goes
    m2, endpoints = monitor(n=2, failure_percentage_request_volume=5, failure_percentage_minimum_hosts=1, enforcing_failure_percentage=100,
                            consecutive_5xx=1000, success_rate_minimum_hosts=100)
    for _ in range(9):
        m2.record(endpoints[0], oc.HTTP_5XX)
    m2.record(endpoints[0], oc.SUCCESS)
    for _ in range(10):
        m2.record(endpoints[1], oc.SUCCESS)
    m2.evaluate()
    assert keys(m2.admit(endpoints)) == ["e1"] and "90% failed" in m2.snapshot("e0")["ejection_detail"]


def test_readiness_unready_at_once_when_definitive_else_after_the_threshold():
    m, (a, b) = monitor()
    m.readiness(a, Verdict(False, "no answer from /health within 1s"))
    assert keys(m.admit([a, b])) == ["e0", "e1"]  # one timeout is not enough (unhealthyThreshold 2)
    m.readiness(a, Verdict(False, "no answer from /health within 1s"))
    adm = m.admit([a, b])
    assert keys(adm) == ["e1"] and adm.excluded["e0"] == "unready: no answer from /health within 1s"
    m.readiness(b, Verdict(False, "cannot connect: refused", definitive=True))
    assert m.snapshot("e1")["state"] == "unready"


def test_back_from_unready_is_half_open_and_a_restart_ends_an_ejection_early():
    clock = Clock()
    m, (a, b) = monitor(clock=clock, consecutive_gateway_failure=1)
    m.record(a, oc.GATEWAY_FAILURE)  # ejected for 10 s
    m.readiness(a, Verdict(False, "/health answered 503", definitive=True))  # ...and seen down
    clock.t += 2
    m.readiness(a, Verdict(True, "/health 200", instances={"decode": (1, 1)}))  # restarted
    assert m.snapshot("e0")["state"] == "half_open" and m.snapshot("e0")["instances"] == {"decode": {"up": 1, "total": 1}}
    assert keys(m.admit([a, b])) == ["e0", "e1"]
    # ejected while its /health kept saying 200 (a shallow check): the ejection runs its course
    m.record(b, oc.GATEWAY_FAILURE)
    m.readiness(b, Verdict(True, "/health 200"))
    assert keys(m.admit([a, b])) == ["e0"]


def test_panic_threshold():
    clock = Clock()
    m, (a, b) = monitor(clock=clock, consecutive_gateway_failure=1)
    m.policy = HealthPolicy(outlier=m.policy.outlier, panic_threshold=50)
    m.readiness(a, Verdict(False, "down", definitive=True))
    m.readiness(b, Verdict(False, "down", definitive=True))
    adm = m.admit([a, b])
    assert adm.panic and keys(adm) == ["e0", "e1"] and set(adm.excluded) == {"e0", "e1"}
    # the last request one of them served failed: it is left out while the other (a flaky check?) is not
    m.record(a, oc.GATEWAY_FAILURE)
    assert keys(m.admit([a, b])) == ["e1"]
    m.record(b, oc.HTTP_5XX)
    assert keys(m.admit([a, b])) == ["e0", "e1"]  # both failed last: all of them
    m.record(a, oc.SUCCESS)
    assert keys(m.admit([a, b])) == ["e0"]
    m.policy = HealthPolicy(outlier=m.policy.outlier, panic_threshold=0)
    adm = m.admit([a, b])
    assert not adm.panic and keys(adm) == []


def test_disabled_admits_everything():
    m = HealthMonitor(policy=HealthPolicy(enabled=False))
    a, b = eps(2)
    m.readiness(a, Verdict(False, "down", definitive=True))
    assert keys(m.admit([a, b])) == ["e0", "e1"]


class Flight:
    def __init__(self, target, started, stream=True, max_tokens=None):
        self.request = LLMRequest("r", "m", "m", "completions", 10, stream=stream, max_tokens=max_tokens)
        self.result = SchedulingResult("d", {"d": ProfileRunResult("d", [target], [target])})
        self.started, self.finished, self.verdict = started, False, ""
        self.first_byte_at, self.response_bytes = 0.0, 0


def test_watchdog_first_byte_deadline_depends_on_streaming_and_output_budget():
    clock = Clock()
    m, (a, b) = monitor(clock=clock, consecutive_gateway_failure=2)
    m.policy = HealthPolicy(outlier=m.policy.outlier, first_byte_timeout=5.0, per_output_token_timeout=0.1)
    streamed = Flight(a, clock.t)
    whole = Flight(a, clock.t, stream=False, max_tokens=100)  # 5 + 100 × 0.1 = 15 s
    clock.t += 6
    assert m.watch([streamed, whole]) == 1 and streamed.verdict == oc.FIRST_BYTE_TIMEOUT and not whole.verdict
    assert m.watch([streamed, whole]) == 0  # counted once
    clock.t += 10
    assert m.watch([streamed, whole]) == 1
    assert m.snapshot("e0")["state"] == "ejected" and m.snapshot("e0")["outcomes"] == {"first_byte_timeout": 2}


def test_watchdog_stalled_stream():
    clock = Clock()
    m, (a, b) = monitor(clock=clock)
    m.policy = HealthPolicy(outlier=m.policy.outlier, stream_idle_timeout=3.0)
    f = Flight(a, clock.t)
    f.first_byte_at = clock.t
    for _ in range(5):  # bytes keep coming: fine
        f.response_bytes += 10
        clock.t += 2
        assert m.watch([f]) == 0
    clock.t += 2
    m.watch([f])
    clock.t += 2
    assert m.watch([f]) == 1 and f.verdict == oc.STREAM_STALLED
    assert "nothing sent for 4.0s after 50 bytes" in m.snapshot("e0")["last_failure"]
    m.watch([])
    assert m._progress == {}  # finished flights are forgotten


@pytest.mark.parametrize("end,status,first_byte,kind", [
    ("success", 200, True, oc.SUCCESS), ("error", 500, True, oc.HTTP_5XX), ("error", 503, True, oc.GATEWAY_FAILURE),
    ("error", 504, True, oc.GATEWAY_FAILURE), ("error", 429, True, oc.CLIENT_ERROR), ("cancelled", 0, False, oc.ABORTED),
    ("cancelled", 200, True, oc.RESET), ("cancelled", 502, True, oc.GATEWAY_FAILURE), ("timeout", 0, False, oc.EXPIRED),
    ("error", 0, False, oc.INTERNAL), ("error", 200, True, oc.INTERNAL),
])
def test_classify(end, status, first_byte, kind):
    assert oc.classify(end, status, first_byte) == kind


def test_plugin_outcomes():
    assert [oc.plugin_outcome(k) for k in (oc.SUCCESS, oc.GATEWAY_FAILURE, oc.STREAM_STALLED, oc.CLIENT_ERROR, oc.RESET, oc.EXPIRED)] == [
        "success", "error", "error", "client_error", "cancelled", "timeout"]


def test_policy_parameters_with_envoy_names_and_clear_errors():
    p = parse_policy("h", {"outlierDetection": {"consecutive5xx": 3, "baseEjectionTime": "10s", "maxEjectionPercent": 50},
                           "readiness": {"path": "/ready", "interval": "500ms", "unhealthyThreshold": 3}, "firstByteTimeout": "2s",
                           "panicThreshold": 0})
    assert p.outlier.consecutive_5xx == 3 and p.outlier.base_ejection_time == 10.0 and p.outlier.max_ejection_percent == 50
    assert p.readiness == ReadinessPolicy(path="/ready", interval=0.5, unhealthy_threshold=3)
    assert p.first_byte_timeout == 2.0 and p.panic_threshold == 0 and p.outlier.consecutive_gateway_failure == 2
    for params, message in (
        ({"outlierDetection": {"consecutive5XX": 3}}, "outlierDetection.consecutive5XX: unknown parameter; known: baseEjectionTime"),
        ({"outlierDetection": {"maxEjectionPercent": 150}}, "outlierDetection.maxEjectionPercent: must be a percentage from 0 to 100"),
        ({"readiness": {"path": "health"}}, "readiness.path: must be a URL path starting with /"),
        ({"readiness": {"interval": "0s"}}, "readiness.interval: must be a positive duration"),
        ({"firstByteTimeout": "soon"}, "firstByteTimeout:"),
        ({"enabled": "yes"}, "enabled: must be true or false"),
        ({"readiness": [1]}, "readiness.: must be a map"),
        ({"timeout": "1s"}, "timeout: unknown parameter"),
    ):
        with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
            parse_policy("h", params)


def test_stream_error_event_status():
    event = b'data: {"id": "x"}\n\ndata: {"error": {"message": "decode closed the connection mid-stream", "type": "DecodeError", "code": 502}}\n\ndata: [DONE]\n\n'
    assert oc.stream_error_status(event) == 502
    assert oc.stream_error_status(b'data: {"error": {"message": "cut') == 500
    assert oc.stream_error_status(b'data: {"error": "engine dead"}\n') == 500
    assert oc.stream_error_status(b'data: {"error": {"code": 429}}\n') == 429
    assert oc.classify("success", 502, True) == oc.GATEWAY_FAILURE
