"""kv-bandwidth-profiler --links: every prefill → decode link measured the Llumnix way, in the file the EPP reads."""

import pytest

from bandwidth_profiler.cli import main
from bandwidth_profiler.links import load_links_spec, links_table, measure
from epp.datastore.links import LinkProfiles, parse_link_profiles
from kv_transfer import KVShape
from tests.disagg.conftest import pod

SPEC = """
instances:
- {name: prefill-0, node: n1, role: prefill}
- {name: decode-0, node: n1, role: decode}
- {name: both-1, node: n2, role: prefill-decode}
fabrics:
  n1: {backend: fs, kv_backend: fs}
  n2: {backend: fs, kv_backend: fs}
  between-nodes: {backend: fs, link_gbps: 0.05, link_latency_ms: 3, kv_backend: ethernet}
classes:
- {level: host, match_kv_backend: fs, backend: fs, kv_backend: fs}
"""


def test_every_pair_is_measured_and_the_epp_reads_the_result(tmp_path):
    path = tmp_path / "links.yaml"
    path.write_text(SPEC)
    spec = load_links_spec(str(path))
    assert [(p.prefill, p.decode, p.kv_backend) for p in spec.pairs()] == [
        ("prefill-0", "decode-0", "fs"), ("prefill-0", "both-1", "ethernet"), ("both-1", "decode-0", "ethernet")]
    done = []
    doc = measure(spec, KVShape(2, 1, 16, 4, "float16"), min_blocks=1, max_blocks=8, points=3, warmup_blocks=1, num_samples=1,
                  fs_dir=str(tmp_path / "kv"), progress=done.append)
    assert len(done) == 4 * 3  # three pairs and one class, three log-spaced block counts each
    table = parse_link_profiles(doc, "measured")
    assert set(table.pairs) == {("prefill-0", "decode-0"), ("prefill-0", "both-1"), ("both-1", "decode-0")}
    ethernet = table.pairs[("prefill-0", "both-1")]
    assert ethernet.blocks == (1, 3, 8) and all(s >= 0.003 for s in ethernet.seconds)  # the link's latency floor
    assert list(ethernet.seconds) == sorted(ethernet.seconds)  # fitted non-decreasing, as the single-backend profiler does
    links = LinkProfiles()
    links.replace(table)
    assert links.lookup(pod("prefill-0", "prefill", "10.0.0.1"), pod("both-1", "prefill-decode", "10.0.0.3"))[1] == "pair"
    assert "prefill-0 -> both-1 | ethernet" in links_table(doc)


@pytest.mark.parametrize("text, fragment", [
    ("{}", "nothing to measure"),
    ("instances: [{name: a, node: n, role: prefill}, {name: b, node: m, role: decode}]\nfabrics: {n: {backend: fs}}",
     "no fabric for the link a -> b: add fabrics.between-nodes"),
    ("links: [{prefill: a, decode: b, backend: rdma}]", "links.0.backend"),
])
def test_bad_specs_are_explained(tmp_path, capsys, text, fragment):
    path = tmp_path / "links.yaml"
    path.write_text(text)
    assert main(["--links", str(path), "--no-progress", "--output-dir", str(tmp_path)]) == 2
    assert fragment in capsys.readouterr().err
