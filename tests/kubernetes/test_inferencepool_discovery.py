"""InferencePool discovery against a local server speaking the Kubernetes list/watch wire format."""

import asyncio

import pytest
from aiohttp import web

from epp.datastore import Datastore
from epp.discovery.kubernetes import InferencePoolDiscovery, kubeconfig_credentials
from tests.conftest import async_wait_until, free_port
from tests.kubernetes.fake_apiserver import FakeAPIServer, kubeconfig_text, pod

PROXY = {"role": "proxy", "app": "vllm-proxy", "llm-d.ai/kv-backend": "nvlink"}


@pytest.fixture
async def api(tmp_path):
    server = FakeAPIServer()
    port = free_port()
    runner = web.AppRunner(server.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(kubeconfig_text(port))
    server.kubeconfig = str(kubeconfig)
    yield server
    server.break_watches()
    await runner.cleanup()


def names(ds):
    return sorted(f"{e.name}@{e.hostport}" for e in ds.endpoints())


async def start(api, **kw):
    ds = Datastore()
    creds = await kubeconfig_credentials(api.kubeconfig)
    disc = InferencePoolDiscovery(ds, "pool", "llm", credentials=creds, backoff=0.05, **kw)
    task = asyncio.create_task(disc.run())
    return ds, disc, task


async def test_pods_join_become_ready_change_labels_and_leave(api):
    api.set_pool({"role": "proxy"}, [8080, 8081])
    api.put(pod("p2p", "10.0.0.1", PROXY))
    api.put(pod("fs", "10.0.0.2", {**PROXY, "llm-d.ai/kv-backend": "fs"}, ready=False))
    api.put(pod("decode", "10.0.0.3", {"role": "decode"}))
    ds, disc, task = await start(api)
    try:
        assert await async_wait_until(lambda: ds.synced, 5)
        assert names(ds) == ["p2p-rank-0@10.0.0.1:8080", "p2p-rank-1@10.0.0.1:8081"]
        assert ds.get("llm/p2p-rank-0").labels["llm-d.ai/kv-backend"] == "nvlink"
        api.put(pod("fs", "10.0.0.2", {**PROXY, "llm-d.ai/kv-backend": "fs"}))  # becomes Ready
        assert await async_wait_until(lambda: len(ds) == 4, 5)
        api.put(pod("fs", "10.0.0.2", {**PROXY, "llm-d.ai/kv-backend": "nvlink"}))  # label change
        assert await async_wait_until(lambda: ds.get("llm/fs-rank-0").labels["llm-d.ai/kv-backend"] == "nvlink", 5)
        api.put(pod("p2p", "10.0.0.1", PROXY, annotations={"inference.networking.k8s.io/active-ports": "8081"}))
        assert await async_wait_until(lambda: ds.get("llm/p2p-rank-0") is None and ds.get("llm/p2p-rank-1") is not None, 5)
        api.put(pod("fs", "10.0.0.2", PROXY, terminating=True))  # terminating: out
        assert await async_wait_until(lambda: names(ds) == ["p2p-rank-1@10.0.0.1:8081"], 5)
        api.delete("p2p")
        assert await async_wait_until(lambda: len(ds) == 0, 5)
    finally:
        task.cancel()


async def test_watch_break_resumes_and_410_relists(api):
    api.set_pool({"role": "proxy"}, [8080])
    api.put(pod("a", "10.0.0.1", PROXY))
    ds, disc, task = await start(api)
    try:
        assert await async_wait_until(lambda: len(ds) == 1, 5)
        lists = api.list_requests
        api.break_watches()  # the connection drops: resume the watch, no relist
        await asyncio.sleep(0.2)
        api.put(pod("b", "10.0.0.2", PROXY))
        assert await async_wait_until(lambda: len(ds) == 2, 5)
        assert api.list_requests == lists
        api.expire()  # 410 Gone: relist, then watch from the new version
        api.put(pod("c", "10.0.0.3", PROXY))
        assert await async_wait_until(lambda: len(ds) == 3 and api.list_requests > lists, 5)
        api.delete("a")
        assert await async_wait_until(lambda: names(ds) == ["b-rank-0@10.0.0.2:8080", "c-rank-0@10.0.0.3:8080"], 5)
    finally:
        task.cancel()


async def test_not_ready_until_first_sync_and_missing_pool(api):
    ds, disc, task = await start(api)
    try:
        await asyncio.sleep(0.3)
        assert not ds.synced and len(ds) == 0  # no pool yet: not serving
        api.set_pool({"role": "proxy"}, [8080])
        api.put(pod("a", "10.0.0.1", PROXY))
        assert await async_wait_until(lambda: ds.synced and len(ds) == 1, 5)
    finally:
        task.cancel()


async def test_epp_health_follows_the_pool_sync(api, tmp_path):
    """`epp serve --pool-name` as a process: NOT_SERVING until the pool is listed, then SERVING."""
    import sys

    from grpc_health.v1 import health_pb2

    from local_stack.processes import ProcessGroup
    from tests.cli.test_epp_process import health_status

    procs = ProcessGroup(tmp_path / "logs")
    ports = [free_port() for _ in range(3)]
    try:
        child = procs.start("epp", ["epp.cli", "--pool-name", "pool", "--pool-namespace", "llm", "--kubeconfig", api.kubeconfig,
                                    "--secure-serving=false", "--bind-address", "127.0.0.1", "--grpc-port", str(ports[0]),
                                    "--grpc-health-port", str(ports[1]), "--metrics-port", str(ports[2])])
        assert await async_wait_until(lambda: health_status(ports[1]) == health_pb2.HealthCheckResponse.NOT_SERVING, 20)
        api.set_pool({"role": "proxy"}, [8080])
        api.put(pod("a", "10.0.0.1", PROXY))
        assert await async_wait_until(lambda: health_status(ports[1]) == health_pb2.HealthCheckResponse.SERVING, 20), child.log_path.read_text()
        assert sys.executable
    finally:
        procs.stop()


def test_in_cluster_credentials_read_the_service_account(tmp_path, monkeypatch):
    from epp.discovery import kubernetes as k8s
    from epp.server import self_signed_certificate

    _, cert = self_signed_certificate()
    (tmp_path / "ca.crt").write_bytes(cert)
    (tmp_path / "token").write_text("first-token\n")
    monkeypatch.setattr(k8s, "SA_DIR", tmp_path)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    creds = k8s.in_cluster_credentials()
    assert creds.server == "https://10.96.0.1:6443"
    assert creds.auth_headers() == {"Authorization": "Bearer first-token"}
    (tmp_path / "token").write_text("rotated-token")  # projected tokens rotate: read per request
    assert creds.auth_headers() == {"Authorization": "Bearer rotated-token"}
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    with pytest.raises(RuntimeError, match="--kubeconfig"):
        k8s.in_cluster_credentials()


async def test_inference_objectives_of_the_pool_give_priorities(api):
    from epp.datastore.objectives import Objectives

    api.set_pool({"role": "proxy"}, [8080])
    api.add_objective("batch", -1)
    api.add_objective("critical", 10, api="inference.networking.x-k8s.io/v1alpha2")  # GIE's group still counts
    api.add_objective("other-pool", -5, pool="someone-else")
    api.add_objective("unset", None)
    objectives = Objectives()
    ds = Datastore()
    creds = await kubeconfig_credentials(api.kubeconfig)
    disc = InferencePoolDiscovery(ds, "pool", "llm", credentials=creds, backoff=0.05, objectives=objectives, objective_poll=0.1)
    task = asyncio.create_task(disc.run())
    try:
        assert await async_wait_until(lambda: len(objectives) == 3, 5)
        assert objectives.for_request({"x-llm-d-inference-objective": "batch"}) == (-1, "default-flow")
        assert objectives.for_request({"x-gateway-inference-objective": "critical", "x-gateway-inference-fairness-id": "t1"}) == (10, "t1")
        assert objectives.for_request({"x-llm-d-inference-objective": "other-pool"})[0] == 0  # another pool's objective
        assert objectives.for_request({"x-llm-d-inference-objective": "unset"})[0] == 0 and objectives.any_sheddable()
        api.objectives["llm-d.ai/v1alpha2"] = []  # deleted: gone at the next poll
        assert await async_wait_until(lambda: objectives.for_request({"x-llm-d-inference-objective": "batch"})[0] == 0, 5)
    finally:
        task.cancel()
