"""Formulas and semantics of the built-in plugins (GIE / llm-d test vectors where they exist)."""

import random

import pytest

from epp.datastore import Datastore, Endpoint
from epp.scheduling import registry
from epp.scheduling.framework import ConfigError, CycleState, LLMRequest, ProfileRunResult, ScoredEndpoint, SchedulingResult
from epp.scheduling.registry import PluginContext


def ep(name, **labels):
    return Endpoint(name=name, address="10.0.0.1", port=8000 + len(name), labels=labels)


def req(**headers):
    return LLMRequest(request_id="r", model="m", target_model="m", api="completions", prompt_tokens=10, headers=headers)


def make(type_name, params=None, ctx=None):
    return registry.create(type_name, type_name, params or {}, ctx or PluginContext(services={"rng": random.Random(7)}))


def result_for(*targets):
    run = ProfileRunResult(profile="default", targets=list(targets), candidates=list(targets))
    return SchedulingResult("default", {"default": run})


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_active_request_test_vectors():
    s = make("active-request-scorer")
    a, b, c = ep("a"), ep("b"), ep("c")
    assert s.score(CycleState(), req(), [a, b, c]) == [1.0, 1.0, 1.0]  # nothing tracked
    requests = []
    for target, n in ((a, 3), (c, 6)):
        for _ in range(n):
            r = req()
            requests.append(r)
            s.pre_request(r, result_for(target))
    assert s.score(CycleState(), req(), [a, b, c]) == [0.5, 1.0, 0.0]  # counts {3, 0, 6}
    for r in requests:
        s.response_complete(r, None, "success")
    assert s.counts == {}


def test_active_request_idle_threshold_and_max_busy():
    s = make("active-request-scorer", {"idleThreshold": 1, "maxBusyScore": 0.5})
    a, b = ep("a"), ep("b")
    for target, n in ((a, 1), (b, 4)):
        for _ in range(n):
            s.pre_request(req(), result_for(target))
    c = ep("c")
    s.pre_request(req(), result_for(c))
    s.pre_request(req(), result_for(c))
    assert s.score(CycleState(), req(), [a, b, c]) == [1.0, 0.0, pytest.approx((4 - 2) / 4 * 0.5)]


def test_active_request_timeout_and_removal():
    clock = FakeClock()
    ds = Datastore()
    s = make("active-request-scorer", {"requestTimeout": "2m"}, PluginContext(datastore=ds))
    s.clock = clock
    a = ds.upsert(ep("a"))
    s.pre_request(req(), result_for(a))
    clock.t += 121
    assert s.purge_expired() == 1 and s.counts == {}
    b = ds.upsert(ep("b"))
    s.pre_request(req(), result_for(b))
    ds.remove("b")
    assert s.counts == {}


def test_active_request_parameter_errors():
    for params in ({"idleThreshold": -1}, {"maxBusyScore": 2}, {"requestTimeout": "soon"}):
        with pytest.raises(ConfigError):
            make("active-request-scorer", params)


def test_label_selector_expressions():
    eps = [ep("a", **{"llm-d.ai/kv-backend": "nvlink", "role": "proxy"}), ep("bb", **{"llm-d.ai/kv-backend": "fs"}), ep("ccc")]
    f = make("label-selector-filter", {"matchExpressions": [{"key": "llm-d.ai/kv-backend", "operator": "In", "values": ["nvlink", "fs"]}]})
    assert [e.name for e in f.filter(CycleState(), req(), eps)] == ["a", "bb"]
    f = make("by-label-selector", {"matchLabels": {"role": "proxy"}, "matchExpressions": [{"key": "llm-d.ai/kv-backend", "operator": "NotIn", "values": ["fs"]}]})
    assert [e.name for e in f.filter(CycleState(), req(), eps)] == ["a"]
    f = make("label-selector-filter", {"matchExpressions": [{"key": "llm-d.ai/kv-backend", "operator": "DoesNotExist"}]})
    assert [e.name for e in f.filter(CycleState(), req(), eps)] == ["ccc"]
    f = make("label-selector-filter", {"matchExpressions": [{"key": "role", "operator": "Exists"}]})
    assert [e.name for e in f.filter(CycleState(), req(), eps)] == ["a"]
    assert len(make("label-selector-filter").filter(CycleState(), req(), eps)) == 3
    with pytest.raises(ConfigError, match="operator 'Has'"):
        make("label-selector-filter", {"matchExpressions": [{"key": "k", "operator": "Has"}]})
    with pytest.raises(ConfigError, match="needs non-empty 'values'"):
        make("label-selector-filter", {"matchExpressions": [{"key": "k", "operator": "In"}]})


def test_role_filters():
    eps = [ep("p", **{"llm-d.ai/role": "prefill"}), ep("d", **{"llm-d.ai/role": "decode"}), ep("bo", **{"llm-d.ai/role": "both"}), ep("none")]
    d = make("decode-filter").filter(CycleState(), req(), eps)
    p = make("prefill-filter").filter(CycleState(), req(), eps)
    assert [e.name for e in d] == ["d", "bo", "none"]
    assert [e.name for e in p] == ["p", "bo"]


def test_kv_backend_scorer_and_header_filter():
    eps = [ep("n", **{"llm-d.ai/kv-backend": "nvlink"}), ep("fs", **{"llm-d.ai/kv-backend": "fs"}), ep("x")]
    s = make("kv-backend-scorer", {"weights": {"nvlink": 1.0, "fs": 0.25}, "defaultScore": 0.1})
    assert s.score(CycleState(), req(), eps) == [1.0, 0.25, 0.1]
    with pytest.raises(ConfigError):
        make("kv-backend-scorer", {"weights": {"nvlink": 3}})
    f = make("kv-backend-header-filter", {"allowedValues": ["nvlink", "fs"]})
    st = CycleState()
    assert [e.name for e in f.filter(st, req(**{"x-kv-backend": "FS"}), eps)] == ["fs"]
    assert st.notes["kv-backend-header-filter"] == {"requested_backend": "fs"}
    assert len(f.filter(CycleState(), req(), eps)) == 3
    st = CycleState()
    assert len(f.filter(st, req(**{"x-kv-backend": "rdma"}), eps)) == 3 and "ignored_header" in st.notes["kv-backend-header-filter"]


def scored(*pairs):
    return [ScoredEndpoint(ep(n), s) for n, s in pairs]


def test_max_score_picker_breaks_ties_at_random():
    p = make("max-score-picker")
    picks = {p.pick(CycleState(), req(), scored(("a", 0.9), ("bb", 0.9), ("ccc", 0.1)))[0].name for _ in range(50)}
    assert picks == {"a", "bb"}
    p3 = make("max-score-picker", {"maxNumOfEndpoints": 2})
    top = p3.pick(CycleState(), req(), scored(("a", 0.2), ("bb", 0.9), ("ccc", 0.5)))
    assert [e.name for e in top] == ["bb", "ccc"]
    with pytest.raises(ConfigError):
        make("max-score-picker", {"maxNumOfEndpoints": 0})


def test_weighted_random_and_random_pickers():
    p = make("weighted-random-picker")
    counts = {"a": 0, "bb": 0}
    for _ in range(2000):
        counts[p.pick(CycleState(), req(), scored(("a", 0.75), ("bb", 0.25)))[0].name] += 1
    assert 0.68 < counts["a"] / 2000 < 0.82
    assert {p.pick(CycleState(), req(), scored(("a", 0), ("bb", 0)))[0].name for _ in range(50)} == {"a", "bb"}
    r = make("random-picker", {"maxNumOfEndpoints": 2})
    assert len(r.pick(CycleState(), req(), scored(("a", 0), ("bb", 1), ("ccc", 1)))) == 2


def test_round_robin_picker_cycles():
    p = make("round-robin-picker")
    s = scored(("a", 0), ("bb", 0), ("ccc", 0))
    assert [p.pick(CycleState(), req(), s)[0].name for _ in range(6)] == ["a", "bb", "ccc", "a", "bb", "ccc"]
