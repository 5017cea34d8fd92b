"""The compatibility suite: EndpointPickerConfig files exactly as GIE and llm-d publish them.

Each file in configs/ names its source (repository, path, commit) in its header and in
configs/index.yaml. A file either loads unchanged and routes a request, or fails with a message
naming every plugin or field this EPP does not implement, all at once. Files that need plugins
another part of the project adds (`needs`) load once those types are registered, and until then
fail naming exactly those types.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from epp.config import ConfigErrors, build, resolve_config
from epp.datastore.endpoint import Endpoint, EndpointMetrics
from epp.scheduling import registry
from epp.scheduling.framework import ConfigError, LLMRequest
from epp.scheduling.registry import PluginContext

CONFIGS = Path(__file__).parent / "configs"
INDEX = yaml.safe_load((CONFIGS / "index.yaml").read_text())


def test_every_config_file_is_indexed_with_its_source():
    files = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != "index.yaml")
    assert files == sorted(e["file"] for e in INDEX)
    for e in INDEX:
        head = (CONFIGS / e["file"]).read_text().splitlines()[:2]
        assert e["repo"] in head[1] and e["path"] in head[1] and e["commit"] in head[1], e["file"]
        assert len(e["commit"]) == 40


def _endpoints() -> list[Endpoint]:
    now = time.monotonic()
    eps = []
    for i, (waiting, kv) in enumerate(((3, 0.5), (0, 0.1))):
        e = Endpoint(name=f"ep{i}", address=f"10.0.0.{i + 1}", port=8000)
        e.metrics = EndpointMetrics(waiting=waiting, running=1, kv_cache_usage=kv, updated_at=now)
        eps.append(e)
    return eps


@pytest.mark.parametrize("entry", INDEX, ids=[e["file"] for e in INDEX])
def test_published_config(entry):
    loaded = resolve_config(config_file=str(CONFIGS / entry["file"]))
    missing = [t for t in entry.get("needs", []) if registry.registered(t) is None]
    refused = entry.get("refused", [])
    if refused or missing:
        with pytest.raises(ConfigError) as e:
            build(loaded)
        text = str(e.value)
        for fragment in refused:
            assert fragment in text, (fragment, text)
        for t in missing:
            assert f"plugin type {t!r} is a Go EPP" in text, (t, text)
        if isinstance(e.value, ConfigErrors):
            # nothing else is wrong with the file: every problem is one the index expects
            for problem in e.value.problems:
                assert any(f in problem for f in refused) or any(f"plugin type {t!r}" in problem for t in missing), problem
        return
    built = build(loaded, PluginContext(services={"metrics_staleness": 60.0}))
    ignored = [w for w in built.warnings if ": ignored: " in w]
    for fragment in entry.get("ignored", []):
        assert any(fragment in w for w in ignored), (fragment, built.warnings)
    assert len(ignored) == len(entry.get("ignored", [])), ignored  # only the parameters the Go EPP drops load with a warning
    request = LLMRequest(request_id="r", model="m", target_model="m", api="chat/completions", prompt_tokens=20,
                         body={"model": "m", "messages": [{"role": "user", "content": "hi " * 20}]}, prompt_text="hi " * 20)
    result = built.scheduler.schedule(request, _endpoints())
    assert result.targets, entry["file"]  # it routes


def test_the_default_configs_are_the_ones_the_issue_names():
    """GIE's and llm-d's defaults: queue 2, kv-cache 2, prefix-cache 3."""
    for name in ("gie-v1.5.0-chart-default.yaml", "llmd-router-chart-default.yaml", "llmd-guide-inference-scheduling.yaml"):
        data = yaml.safe_load((CONFIGS / name).read_text())
        weights = {r["pluginRef"]: r["weight"] for r in data["schedulingProfiles"][0]["plugins"]}
        assert weights == {"queue-scorer": 2, "kv-cache-utilization-scorer": 2, "prefix-cache-scorer": 3}


def test_the_go_epp_type_table_names_only_types_not_implemented_here():
    """The table explains unknown types; a type registered here must not be described as missing."""
    from epp.config.go_epp_types import GO_EPP_PLUGINS

    assert [t for t in GO_EPP_PLUGINS if registry.registered(t) is not None] == []
