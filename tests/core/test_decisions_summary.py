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
