"""epp-bench's P/D route analysis: routes from the EPP's decision log, and how traffic left a degraded link."""

import json
from datetime import datetime, timezone

import pytest

from serving_benchmark.pd_routes import Degrade, moved_off, routes, summarize_routes


def decision(at: float, decode: str, prefill: str | None) -> str:
    ts = datetime.fromtimestamp(at, timezone.utc).isoformat().replace("+00:00", "Z")
    d = {"msg": "Scoring decision", "ts": ts, "selected": [decode], "request_headers": {"x-prefiller-host-port": prefill} if prefill else {}}
    return json.dumps(d)


def test_routes_and_the_move_off_a_degraded_link(tmp_path):
    names = {"127.0.0.1:1": "prefill-a", "127.0.0.1:2": "decode-a", "127.0.0.1:3": "prefill-b"}
    t0 = 1_700_000_000.0
    lines = [decision(t0 + i, "127.0.0.1:2", "127.0.0.1:1") for i in range(5)]  # before: all over a -> a
    lines += [decision(t0 + 5.5, "127.0.0.1:2", "127.0.0.1:1")]  # one more on its way
    lines += [decision(t0 + 6 + i, "127.0.0.1:2", "127.0.0.1:3" if i % 2 else None) for i in range(20)]
    lines += ['{"msg": "other"}', "not json", decision(t0 + 100, "127.0.0.1:2", None)]  # outside the run
    log = tmp_path / "epp.log"
    log.write_text("\n".join(lines))
    taken = routes(log, names, t0 - 1, t0 + 50)
    assert len(taken) == 26
    out = summarize_routes(taken, Degrade("prefill-a", "decode-a", 0.1, 5), t0 + 5)
    assert out["routes"] == {"prefill-a->decode-a": 6, "local->decode-a": 10, "prefill-b->decode-a": 10}
    d = out["degraded"]
    assert d["share_before"] == 1.0 and d["share_after"] == 0.0 and d["last_use_after_s"] == 0.5
    assert d["moved_off_after_s"] == 0.5  # from then on 1 in 21 (≤ 5 %) took the link
    assert d["timeline"][:2] == [[-5.0, 1, 1], [-4.0, 1, 1]] and d["timeline"][5] == [0.0, 1, 1]
    assert moved_off([(t0 + 6, "x")], "x", t0) is None


def test_degrade_spec_errors_say_the_format():
    assert Degrade.parse("prefill-a, decode-a, 0.005, 5") == Degrade("prefill-a", "decode-a", 0.005, 5.0)
    with pytest.raises(ValueError, match="PREFILL,DECODE,FACTOR,AT_SECONDS"):
        Degrade.parse("prefill-a,decode-a")
