"""The gRPC health port, answered from its own threads so probes never wait for the event loop.

The event loop serves ext_proc; when it is busy (a burst of requests, a large body being parsed),
anything queued on it waits. Kubelet probes the health port, and a probe that times out restarts
a pod that is merely busy. This server runs grpc's threaded server with a copy of the health
statuses: a check needs only the GIL, which the loop thread yields every few milliseconds.
The ext_proc port keeps its own health service on the loop (Envoy's checks) with the same statuses.
"""

from __future__ import annotations

import asyncio
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio


class MirroredHealth(health_aio.HealthServicer):
    """The loop's health servicer; every status set on it is also set on `threaded`."""

    def __init__(self) -> None:
        super().__init__()
        self.threaded = health.HealthServicer()

    async def set(self, service: str, status) -> None:  # noqa: A003 (grpc's name)
        await super().set(service, status)
        self.threaded.set(service, status)

    async def enter_graceful_shutdown(self) -> None:
        await super().enter_graceful_shutdown()
        self.threaded.enter_graceful_shutdown()


class ThreadedHealthServer:
    """grpc's threaded server behind the start/stop/add_*_port calls of `grpc.aio.Server`."""

    def __init__(self, servicer: MirroredHealth, workers: int = 2) -> None:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="epp-health"))
        health_pb2_grpc.add_HealthServicer_to_server(servicer.threaded, self._server)

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, credentials: grpc.ServerCredentials) -> int:
        return self._server.add_secure_port(address, credentials)

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    async def start(self) -> None:
        self._server.start()

    async def stop(self, grace: float | None) -> None:
        await asyncio.to_thread(self._server.stop(grace).wait)
