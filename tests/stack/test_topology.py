"""Topology files: the checked-in examples load, and mistakes are reported with file and field."""

from pathlib import Path

import pytest

from local_stack.topology import load_topology

TOPOLOGIES = sorted((Path(__file__).resolve().parents[2] / "local_stack" / "topologies").glob("*.yaml"))


@pytest.mark.parametrize("path", TOPOLOGIES, ids=lambda p: p.stem)
def test_checked_in_topologies_load(path):
    t = load_topology(str(path))
    assert {b.label for b in t.backends} <= {"nvlink", "fs"} and t.backends


def test_defaults_and_errors(tmp_path):
    t = load_topology(None)
    assert [(b.label, b.pairs) for b in t.backends] == [("nvlink", 1), ("fs", 1)]
    bad = tmp_path / "bad.yaml"
    bad.write_text("backends:\n- {label: fs, transfer: tape, proxy_name: p}\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: backends\.0\.transfer"):
        load_topology(str(bad))
    bad.write_text("latency: {prefill_tokens_per_secnd: 1}\n")
    with pytest.raises(ValueError, match="prefill_tokens_per_secnd"):
        load_topology(str(bad))
