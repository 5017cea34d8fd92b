"""Two and three `epp serve` replicas with --ha-enable-leader-election against a Kubernetes API speaking the Lease wire format.

Only the leader is ready; followers are live and keep their datastore warm; killing the leader
makes a follower ready within the lease duration; a paused leader never overlaps with its
successor; a leader that stops gracefully hands over at once. A monitor samples every replica's
readiness all along and fails the test if two are ever ready at the same moment.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.admin.v1 import admin_pb2, admin_pb2_grpc
from epp.server import default_admin_socket
from local_stack.processes import ProcessGroup
from tests.conftest import free_port, wait_until
from tests.kubernetes.fake_apiserver import ThreadedAPIServer, pod

LEASE, RENEW, RETRY = 2.0, 1.5, 0.25
SERVING = health_pb2.HealthCheckResponse.SERVING
LEASE_NAME = "epp-llm-pool.llm-d.ai"


@pytest.fixture
def api(tmp_path):
    server = ThreadedAPIServer(tmp_path)
    server.call(server.server.set_pool, {"role": "proxy"}, [8080])
    for i in range(2):
        server.call(server.server.put, pod(f"p{i}", f"10.0.0.{i + 1}", {"role": "proxy"}))
    yield server
    server.stop()


class Replica:
    def __init__(self, procs: ProcessGroup, name: str, kubeconfig: str) -> None:
        self.name = name
        self.grpc, self.health, self.metrics = free_port(), free_port(), free_port()
        self.child = procs.start(name, [
            "epp.cli", "--pool-name", "pool", "--pool-namespace", "llm", "--kubeconfig", kubeconfig, "--secure-serving=false",
            "--bind-address", "127.0.0.1", f"--grpc-port={self.grpc}", f"--grpc-health-port={self.health}", f"--metrics-port={self.metrics}",
            "--ha-enable-leader-election", f"--leader-election-lease-duration={LEASE}s", f"--leader-election-renew-deadline={RENEW}s",
            f"--leader-election-retry-period={RETRY}s", "--drain-timeout=2s", "--config-profile", "proxy-performance",
        ], env={"POD_NAME": f"epp-5d9c7b-{name}"})
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.health}")
        self.admin = grpc.insecure_channel("unix:" + default_admin_socket(self.grpc))

    def status(self, service: str) -> int | None:
        if self.child.proc.poll() is not None:
            return None
        try:
            return health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=0.5).status
        except grpc.RpcError:
            return None

    def ready(self) -> bool:
        return self.status("readiness") == SERVING

    def endpoints(self) -> int:
        resp = admin_pb2_grpc.EndpointPickerAdminStub(self.admin).ListEndpoints(admin_pb2.ListEndpointsRequest(), timeout=1)
        return len(resp.endpoints) if resp.synced else -1


class ReadinessMonitor:
    """Samples every replica's readiness in a loop; records any moment with more than one ready."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.replicas = replicas
        self.overlaps: list[list[str]] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            ready = [r.name for r in list(self.replicas) if r.ready()]
            self.samples += 1
            if len(ready) > 1:
                self.overlaps.append(ready)
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_only_the_leader_is_ready_and_a_follower_takes_over(api, tmp_path):
    procs = ProcessGroup(tmp_path / "logs")
    replicas = [Replica(procs, "a", api.kubeconfig), Replica(procs, "b", api.kubeconfig)]
    monitor = ReadinessMonitor(replicas)
    try:
        assert wait_until(lambda: sum(r.ready() for r in replicas) == 1, 40), [r.child.log_path.read_text()[-2000:] for r in replicas]
        leader = next(r for r in replicas if r.ready())
        follower = next(r for r in replicas if r is not leader)
        # both are live; the follower's datastore is warm; with leader election the chart's name is unknown
        assert wait_until(lambda: follower.status("liveness") == SERVING and follower.endpoints() == 2, 20)
        assert leader.endpoints() == 2
        assert follower.status("readiness") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert follower.status("envoy.service.ext_proc.v3.ExternalProcessor") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert leader.status("") == SERVING and leader.status("inference-extension") == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        lease = api.server.leases[LEASE_NAME]
        assert lease["spec"]["leaseDurationSeconds"] == 2 and lease["spec"]["holderIdentity"].startswith(os.uname().nodename)

        # kill the leader outright: the follower is ready within the lease duration
        os.killpg(leader.child.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        assert wait_until(follower.ready, LEASE + 5, interval=0.02)
        took = time.monotonic() - killed
        print(f"follower ready {took:.2f}s after the leader was killed (lease duration {LEASE}s)")
        assert took <= LEASE + 0.25, took  # the slack is the probe interval and scheduling on a loaded 2-core machine
        assert api.server.leases[LEASE_NAME]["spec"]["leaseTransitions"] >= 1

        # a third replica joins as follower; pause the leader: the successor never overlaps with it
        third = Replica(procs, "c", api.kubeconfig)
        replicas.append(third)
        assert wait_until(lambda: third.status("liveness") == SERVING and third.endpoints() == 2, 40)
        assert not third.ready()
        paused = follower
        os.killpg(paused.child.proc.pid, signal.SIGSTOP)
        try:
            assert wait_until(third.ready, LEASE + 5, interval=0.02)
        finally:
            os.killpg(paused.child.proc.pid, signal.SIGCONT)
        assert wait_until(lambda: paused.status("liveness") == SERVING, 10)
        time.sleep(RENEW)  # the resumed old leader must find it lost the lease and stay unready
        assert not paused.ready() and third.ready()

        # graceful stop of the leader: the lease is released and the other replica leads within a retry period or two
        os.killpg(third.child.proc.pid, signal.SIGTERM)
        stopped = time.monotonic()
        assert wait_until(paused.ready, LEASE + 5, interval=0.02)
        handover = time.monotonic() - stopped
        print(f"handover after a graceful stop: {handover:.2f}s")
        assert handover < LEASE, handover
        assert third.child.proc.wait(10) == 0
    finally:
        monitor.stop()
        procs.stop()
    assert monitor.samples > 50
    assert not monitor.overlaps, monitor.overlaps[:5]
    # every lease write was either a success by one holder or a 409 for the loser: never two winners at once
    holders = [h for name, h, status in api.server.lease_writes if name == LEASE_NAME and status in (200, 201)]
    assert holders and len(set(holders) - {""}) >= 3


async def test_followers_stay_empty_when_the_gate_says_so(api):
    """featureGates: [haPopulateNonLeaderDatastore=false]: a follower discovers nothing until it leads."""
    from epp.server import EPPServer, ServerOptions
    from tests.conftest import async_wait_until

    config = ("apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nfeatureGates: [haPopulateNonLeaderDatastore=false]\n"
              "plugins: [{type: active-request-scorer}]\n")

    def server() -> EPPServer:
        return EPPServer(ServerOptions(grpc_port=0, grpc_health_port=0, metrics_port=0, bind_address="127.0.0.1", secure_serving=False,
                                       pool_name="pool", pool_namespace="llm", kubeconfig=api.kubeconfig, config_text=config,
                                       ha_enable_leader_election=True, leader_election_timing=(LEASE, RENEW, RETRY)))

    first, second = server(), server()
    await first.start()
    try:
        assert await async_wait_until(lambda: first.health.ready() and len(first.datastore) == 2, 20)
        await second.start()
        await asyncio.sleep(3 * RETRY)
        assert not second.health.ready() and len(second.datastore) == 0 and not second.datastore.synced
        await first.stop(0)  # releases the lease: the second leads, then discovers
        assert await async_wait_until(lambda: second.health.ready() and len(second.datastore) == 2, 20)
    finally:
        await second.stop(0)
