"""The datastore contract every discovery source and stateful plugin relies on."""

import threading

from epp.datastore import Datastore, Endpoint, EndpointMetrics, TransferProfile
from epp.datastore.endpoint import KV_BACKEND_LABEL


def ep(name, port=8000, **labels):
    return Endpoint(name=name, address="10.0.0.1", port=port, labels=labels)


def test_snapshot_is_sorted_and_immutable():
    ds = Datastore()
    ds.upsert(ep("b"))
    ds.upsert(ep("a"))
    snap = ds.endpoints()
    assert [e.name for e in snap] == ["a", "b"]
    ds.remove("a")
    assert [e.name for e in snap] == ["a", "b"], "an old snapshot must not change under a reader"
    assert [e.name for e in ds.endpoints()] == ["b"]


def test_upsert_keeps_metrics_and_identity():
    ds = Datastore()
    first = ds.upsert(ep("a", role="proxy"))
    ds.set_metrics("a", EndpointMetrics(waiting=3, updated_at=1.0))
    same = ds.upsert(ep("a", role="proxy"))
    assert same is first, "an unchanged upsert returns the published object"
    relabelled = ds.upsert(ep("a", role="decode"))
    assert relabelled is not first
    assert relabelled.metrics.waiting == 3, "a label change keeps live metrics"
    assert ds.get("a").labels["role"] == "decode"


def test_replace_all_notifies_removals_only():
    ds = Datastore()
    removed = []
    ds.on_removal(lambda e: removed.append(e.name))
    ds.replace_all([ep("a"), ep("b"), ep("c")])
    ds.replace_all([ep("b"), ep("d")])
    assert sorted(removed) == ["a", "c"]
    assert [e.name for e in ds.endpoints()] == ["b", "d"]


def test_synced_event():
    ds = Datastore()
    assert not ds.synced
    assert not ds.wait_synced(0.01)
    threading.Timer(0.05, ds.mark_synced).start()
    assert ds.wait_synced(2.0)
    assert ds.synced


def test_endpoint_addressing():
    v4 = Endpoint(name="p", address="10.1.2.3", port=8080, labels={KV_BACKEND_LABEL: "nvlink"}, namespace="ns")
    v6 = Endpoint(name="q", address="fd00::1", port=8080)
    assert v4.hostport == "10.1.2.3:8080"
    assert v6.hostport == "[fd00::1]:8080"
    assert v4.key == "ns/p" and v6.key == "q"
    assert v4.kv_backend == "nvlink" and v6.kv_backend == ""
    assert v4.scrape_url() == "http://10.1.2.3:8080/metrics"


def test_metrics_age():
    assert EndpointMetrics().age() == float("inf")
    assert EndpointMetrics(updated_at=10.0).age(now=12.5) == 2.5
    prof = TransferProfile(blocks=(1, 10), seconds=(0.001, 0.01), block_tokens=16, backend="nvlink")
    assert EndpointMetrics(transfer_profile=prof).transfer_profile.backend == "nvlink"
