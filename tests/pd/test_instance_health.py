"""The proxy's instance-health state machine, on a fake clock: down/up, ejection growth, half-open probes, stalls."""

import asyncio

import pytest

from pd_proxy.instances import HealthPolicy, HealthTracker, Instance, Leg


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup():
    clock, events, suspects = Clock(), [], []
    tracker = HealthTracker(HealthPolicy(consecutive_failures=3, base_ejection=2.0, max_ejection=5.0, stall_timeout=10.0),
                            log=lambda inst, msg: events.append((inst.url, msg)), on_suspect=suspects.append, clock=clock)
    a, b = Instance.parse("http://a:1"), Instance.parse("http://b:2=b:9")
    return tracker, clock, events, suspects, a, b


def test_down_until_health_passes_and_the_other_instance_serves(setup):
    t, clock, events, suspects, a, b = setup
    assert t.pick([a, b]) is a and a.address == "a:1" and b.kv_addr == "b:9"
    t.failed(a, "connect", "cannot connect: refused")
    assert t.state(a) == "down" and suspects == [a]
    assert t.pick([a, b]) is b  # the next request goes to the other one
    assert t.pick([a]) is None and "http://a:1 down for 0.0s (cannot connect: refused)" in t.why_not([a])
    t.health_result(a, False, "/health answered 503")
    assert t.state(a) == "down" and a.health.failures == {"connect": 1, "health": 1}
    clock.now += 3
    t.health_result(a, True)
    assert t.state(a) == "up"
    t.health_result(a, False, "/health did not answer within 2s", slow=True)
    assert t.state(a) == "up"  # one slow answer on a loaded machine is not proof
    t.health_result(a, False, "/health did not answer within 2s", slow=True)
    assert t.state(a) == "down"
    t.health_result(a, True)
    assert t.state(a) == "up" and events[-1] == ("http://a:1", "back: /health passes after 0.0s down (/health did not answer within 2s)")


def test_consecutive_failures_eject_with_growing_time_and_a_probe_readmits(setup):
    t, clock, events, _, a, b = setup
    for _ in range(2):
        t.failed(a, "5xx", "HTTP 500")
    t.succeeded(a)  # a success in between: the count starts over
    for _ in range(3):
        t.failed(a, "5xx", "HTTP 500")
    assert t.state(a) == "ejected" and a.health.ejections == 1
    assert events[-1] == ("http://a:1", "ejected for 2s: 3 failures in a row, the last: HTTP 500")
    assert t.pick([a]) is None
    t.health_result(a, True)  # a sick engine may pass /health: the ejection stands
    assert t.state(a) == "ejected"
    clock.now += 2.1
    assert t.state(a) == "probe"
    assert t.pick([a]) is a
    t.acquire(a)
    assert t.pick([a]) is None  # one probe at a time
    t.failed(a, "5xx", "HTTP 500")  # the probe failed: ejected again, for longer
    t.release(a)
    assert t.state(a) == "ejected" and a.health.ejections == 2 and a.health.ejected_until == pytest.approx(clock.now + 4.0)
    clock.now += 4.1
    t.acquire(a)
    t.succeeded(a)
    t.release(a)
    assert t.state(a) == "up" and "re-admitted" in events[-1][1]
    for _ in range(3):  # a third ejection is capped at max_ejection
        t.failed(a, "timeout", "timed out")
    assert a.health.ejected_until == pytest.approx(clock.now + 5.0)


def test_ejection_count_starts_over_after_a_quiet_while(setup):
    t, clock, _, _, a, _ = setup
    for _ in range(3):
        t.failed(a, "reset", "lost")
    clock.now += 100
    t.health_result(a, True)
    for _ in range(3):
        t.failed(a, "reset", "lost")
    assert a.health.ejections == 1


def test_stall_ejects_and_aborts_the_calls_in_flight(setup):
    t, clock, _, _, a, _ = setup

    async def run():
        leg = Leg(asyncio.ensure_future(asyncio.sleep(60)))
        t.leg_started(a, leg)
        clock.now += 5
        t.progress(a)  # a byte came
        clock.now += 9
        assert t.stalled(a) is None
        t.counters_moved(a, 10.0)
        t.counters_moved(a, 10.0)  # the engine's token counters did not move
        clock.now += 1.5
        reason = t.stalled(a)
        assert reason and reason.startswith("no progress for 10.5s with 1 call(s) in flight")
        t.end_stall(a, reason)
        assert t.state(a) == "ejected" and leg.abort_reason == reason
        with pytest.raises(asyncio.CancelledError):
            await leg.task
        t.leg_ended(a, leg)
        assert t.stalled(a) is None  # nothing in flight: an idle instance never stalls

    asyncio.run(run())


def test_view_for_health_and_metrics(setup):
    t, clock, _, _, a, b = setup
    t.failed(b, "connect", "refused")
    assert t.view("decode", a) == {"role": "decode", "instance": "a:1", "url": "http://a:1", "up": True, "state": "up",
                                   "in_flight": 0, "ejections": 0, "failures": {}}
    v = t.view("decode", b)
    assert v["state"] == "down" and v["up"] is False and v["reason"] == "refused" and v["failures"] == {"connect": 1}
