"""The sidecar's header parsing, prefill allowlist and live link profiles, without processes."""

import os
import time

import pytest
import yaml

from pd_proxy.link_profile import GRID, LiveLinkProfiles
from pd_proxy.prefill_targets import PrefillAllowlist, TargetRefused, parse_target


@pytest.mark.parametrize("value, target", [
    (None, None), ("", None), ("  ", None), (" , 10.0.0.2:80", None),
    ("10.0.0.1:8000", "10.0.0.1:8000"), (" 10.0.0.1:8000 , 10.0.0.2:8000", "10.0.0.1:8000"),
    ("[fe80::1]:8000", "[fe80::1]:8000"), ("Pod-A.ns:8000", "pod-a.ns:8000"), ("10.0.0.1:08000", "10.0.0.1:8000"),
])
def test_the_first_value_trimmed_is_the_target(value, target):
    assert parse_target(value) == target


@pytest.mark.parametrize("value", ["10.0.0.1", "10.0.0.1:0", "10.0.0.1:70000", "http://10.0.0.1:80/", "user@10.0.0.1:80", ":80",
                                   "10.0.0.1:80x", "a" * 400 + ":80"])
def test_what_is_not_host_port_is_a_400(value):
    with pytest.raises(TargetRefused) as e:
        parse_target(value)
    assert e.value.status == 400


def test_the_allowlist_follows_the_endpoints_file(tmp_path):
    f = tmp_path / "eps.yaml"

    def write(eps):
        f.write_text(yaml.safe_dump({"endpoints": eps}))
        os.utime(f, (time.time() + len(eps), time.time() + len(eps)))  # a new mtime even within one second

    write([{"name": "p", "address": "10.0.0.1", "port": 8000, "labels": {"llm-d.ai/role": "prefill"}},
           {"name": "d", "address": "10.0.0.2", "port": 8000, "labels": {"llm-d.ai/role": "decode"}},
           {"name": "pd", "address": "10.0.0.3", "port": 8000, "labels": {"llm-d.ai/role": "prefill-decode"}},
           {"name": "u", "address": "10.0.0.4", "port": 8000}])
    allow = PrefillAllowlist(["10.0.0.9:9000"], str(f), recheck_s=0)
    assert allow.targets() == {"10.0.0.1:8000", "10.0.0.3:8000", "10.0.0.9:9000"}  # decode and unlabelled pods are not prefill targets
    with pytest.raises(TargetRefused) as e:
        allow.check("10.0.0.2:8000")
    assert e.value.status == 403 and "x-prefiller-host-port" in str(e.value)
    f.write_text("endpoints: [broken")  # a half-saved edit keeps the last good set
    os.utime(f, (time.time() + 10, time.time() + 10))
    assert allow.allowed("10.0.0.1:8000")
    write([{"name": "p2", "address": "10.0.0.5", "port": 8000, "labels": {"llm-d.ai/role": "prefill"}}])
    assert allow.allowed("10.0.0.5:8000") and not allow.allowed("10.0.0.1:8000")


def test_live_profiles_fit_latency_and_bandwidth_and_forget_old_points():
    now = [0.0]
    live = LiveLinkProfiles(block_tokens=16, max_age=10, clock=lambda: now[0])
    for blocks in (8, 32, 64, 8):
        live.observe("10.0.0.1:8000", blocks * 16, 0.002 + 0.001 * blocks)
    pts = dict(live.profiles()["10.0.0.1:8000"])
    assert list(pts) == list(GRID)
    assert pts[1] == pytest.approx(0.003) and pts[1024] == pytest.approx(0.002 + 1.024)
    live.observe("10.0.0.2:8000", 320, 0.1)  # one size only: all of it counted as bandwidth
    assert dict(live.profiles()["10.0.0.2:8000"])[64] == pytest.approx(0.32)
    now[0] = 11
    assert live.profiles() == {}
