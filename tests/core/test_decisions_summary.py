"""`epp decisions` on log lines: splits, prompt sizes per kv-backend, failures, non-JSON lines skipped."""

import io
import json

from epp.observability.decisions_summary import render, summarize


def decision(backend, name, tokens, totals):
    return json.dumps({"msg": "Scoring decision", "kv_backend": backend, "selected_name": name, "selected": ["10.0.0.1:8000"],
                       "prompt_tokens": tokens, "profile": "predicted-latency", "totals": totals,
                       "scores": {name: {"predicted-latency-scorer": 1.0}}})


def test_summary_of_a_log():
    lines = [decision("nvlink", "p2p", t, {"p2p": 1.0}) for t in (400, 900, 2000)]
    lines += [decision("fs", "fs", t, {"fs": 0.9}) for t in (50, 120)]
    lines += ["starting up", "{not json", json.dumps({"msg": "Scheduling failed", "error_code": "ServiceUnavailable"})]
    s = summarize(lines)
    assert s["decisions"] == 5 and s["failures"] == {"ServiceUnavailable": 1}
    assert s["by_kv_backend"] == {"nvlink": 3, "fs": 2}
    assert s["prompt_tokens_by_kv_backend"]["nvlink"]["p50"] == 900 and s["prompt_tokens_by_kv_backend"]["fs"]["max"] == 120
    out = io.StringIO()
    render(s, out)
    text = out.getvalue()
    assert "5 scoring decisions, 1 scheduling failures" in text
    assert "prompt tokens by selected kv-backend:" in text and "nvlink       n=3 p50=900 p90=2000 max=2000" in text


def test_endpoint_health_per_endpoint():
    ev = lambda **kw: json.dumps(kw)  # noqa: E731
    lines = [decision("nvlink", "p2p", 100, {"p2p": 1.0}) for _ in range(3)]
    lines += [ev(msg="Request ended", endpoint="p2p", outcome="gateway_failure", status=503)] * 2
    lines += [ev(msg="Endpoint ejected", endpoint="p2p", reason="consecutive_gateway_failure", detail="2 gateway failures in a row")]
    lines += [ev(msg="Endpoint unready", endpoint="p2p", readiness="/health answered 503")]
    lines += [json.dumps({**json.loads(decision("fs", "fs", 100, {"fs": 1.0})), "excluded": {"p2p": "ejected: …"}}) for _ in range(4)]
    lines += [ev(msg="Endpoint ready", endpoint="p2p"), ev(msg="Endpoint re-admitted", endpoint="p2p")]
    s = summarize(lines)
    h = s["endpoint_health"]
    assert h["p2p"] == {"picks": 3, "ended_badly": {"gateway_failure": 2}, "excluded_from": 4, "ejections": {"consecutive_gateway_failure": 1},
                        "unready": 1, "ready": 1, "re_admitted": 1}
    assert h["fs"]["picks"] == 4 and h["fs"]["ended_badly"] == {}
    out = io.StringIO()
    render(s, out)
    assert ("p2p                          picks=3  ended badly: gateway_failure=2  left out of 4  ejections: consecutive_gateway_failure=1  "
            "unready 1× ready again 1× re-admitted 1×") in out.getvalue()
