"""llm-d's published P/D configs (tests/data/llm-d-pd-configs, each with its source repo, path and commit) load and route.

Two loader features these configs use are being added on other branches in parallel (the
drop-in work): the `llm-d.ai/v1alpha1` apiVersion and the prefix-cache plugins. Where this
branch lacks them, the unchanged config is skipped with that reason and the same config is also
loaded with just those parts taken out (apiVersion → the GIE group, prefix-cache plugins and
their references removed), so the P/D plugins are tested either way.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from epp.config.loader import API_VERSION, DEPRECATED_API_VERSIONS
from epp.scheduling import registry
from tests.disagg.conftest import Built, pod, request

API_VERSIONS = (API_VERSION, *DEPRECATED_API_VERSIONS)
DATA = Path(__file__).resolve().parent.parent / "data" / "llm-d-pd-configs"
CONFIGS = sorted(DATA.glob("*.yaml"))
ELSEWHERE = {"approx-prefix-cache-producer", "prefix-cache-scorer"}  # plugin types the drop-in branch adds
NO_PREFILL_STAGE = {"router-head-sim-e-pd-epp-config.yaml"}  # E/PD: an encode stage, no prefill stage


def pool():
    return [
        pod("encode-0", "encode", "10.0.0.5", "worker-a"),
        pod("prefill-a", "prefill", "10.0.1.1", "worker-a"),
        pod("prefill-b", "prefill", "10.0.2.1", "worker-b"),
        pod("decode-a", "decode", "10.0.1.2", "worker-a"),
    ]


def missing_features(text: str) -> list[str]:
    data = yaml.safe_load(text)
    out = []
    if data.get("apiVersion") not in (None, *API_VERSIONS):
        out.append(f"apiVersion {data['apiVersion']}")
    known = set(registry.known_types())
    out.extend(f"plugin type {p['type']}" for p in data["plugins"] if p["type"] not in known)
    return out


def core(text: str) -> str:
    """The config with the features other branches add taken out."""
    data = yaml.safe_load(text)
    data["apiVersion"] = API_VERSIONS[0]
    dropped = {p.get("name") or p["type"] for p in data["plugins"] if p["type"] in ELSEWHERE}
    data["plugins"] = [p for p in data["plugins"] if (p.get("name") or p["type"]) not in dropped]
    for prof in data.get("schedulingProfiles") or []:
        prof["plugins"] = [r for r in prof["plugins"] if r["pluginRef"] not in dropped]
    return yaml.safe_dump(data)


def check_routing(b: Built, name: str) -> None:
    text = request(200, "long", text="x" * 800, body={"messages": [{"role": "user", "content": "x" * 800}]})
    r = b.route(text)
    assert r.targets[0].name == "decode-a"  # the decode pod is the destination
    if name in NO_PREFILL_STAGE:
        assert r.request_headers == {}
    else:
        assert r.request_headers["x-prefiller-host-port"] in ("10.0.1.1:8000", "10.0.2.1:8000")
        assert r.notes["disaggregation"]["decision"] == "prefill-decode"
    if "-e-" in name:  # E/PD and E/P/D: a multimodal request also gets an encoder
        image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]}
        r = b.route(request(200, "mm", text="x" * 800, body=image))
        assert r.request_headers["x-encoder-hosts-ports"] == "10.0.0.5:8000"


def test_the_collected_configs_name_their_source():
    assert len(CONFIGS) >= 9
    for path in CONFIGS:
        first = path.read_text().splitlines()[0]
        assert re.match(r"# source: https://github\.com/llm-d/[\w.-]+/blob/[0-9a-f]{40}/", first), path.name


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_published_config_loads_and_routes_unchanged(path):
    text = path.read_text()
    missing = missing_features(text)
    if missing:
        unexpected = [m for m in missing if m.startswith("plugin type") and m.split()[-1] not in ELSEWHERE]
        assert not unexpected, f"{path.name}: {unexpected}"
        pytest.skip(f"needs {', '.join(missing)} (added by the drop-in branch); tested without them below")
    check_routing(Built(text, pool()), path.name)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_published_config_p_d_part_loads_and_routes(path):
    check_routing(Built(core(path.read_text()), pool()), path.name)


def test_topology_config_keeps_the_prefill_pick_on_the_decode_pods_host():
    b = Built(core((DATA / "router-head-pd-topology-epp-config.yaml").read_text()), pool())
    for i in range(10):
        r = b.route(request(200, f"r{i}", text="x" * 800))
        assert r.request_headers["x-prefiller-host-port"] == "10.0.1.1:8000"  # prefill-a shares worker-a with decode-a
        assert r.profile_results["prefill"].filtered_out["topology-affinity-filter"] == ["prefill-b"]
