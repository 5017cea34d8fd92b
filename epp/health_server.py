"""The gRPC health port, answered from its own threads so probes never wait for the event loop.

The event loop serves ext_proc; when it is busy (a burst of requests, a large body being parsed),
anything queued on it waits. Kubelet probes the health port, and a probe that times out restarts
a pod that is merely busy. This server runs grpc's threaded server over the same answers as the
loop's `HealthService` (`epp.health`): a check reads a few flags and needs only the GIL, which the
loop thread yields every few milliseconds. The ext_proc port keeps its health service on the loop
(Envoy's checks).
"""

from __future__ import annotations

import asyncio
from concurrent import futures

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.health import HealthService


class ThreadedHealth(health_pb2_grpc.HealthServicer):
    """Synchronous twin of `HealthService`: same statuses, computed on every probe."""

    def __init__(self, service: HealthService) -> None:
        self.service = service

    def Check(self, request, context):  # noqa: N802 (gRPC name)
        return health_pb2.HealthCheckResponse(status=self.service.status(request.service))

    def List(self, request, context):  # noqa: N802
        return self.service.list_response()

    def Watch(self, request, context):  # noqa: N802
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Watch is not implemented")


class ThreadedHealthServer:
    """grpc's threaded server behind the start/stop/add_*_port calls of `grpc.aio.Server`."""

    def __init__(self, service: HealthService, workers: int = 2) -> None:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="epp-health"))
        health_pb2_grpc.add_HealthServicer_to_server(ThreadedHealth(service), self._server)

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
