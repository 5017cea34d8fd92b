"""grpc.health.v1 with the Go EPP's answers (llm-d-router `cmd/epp/runner/health.go`).

"Live" means discovery has completed its first sync. Without leader election every service name
(`""`, `inference-extension`, `liveness`, `readiness`, the ext_proc service, …) is SERVING iff live
and not draining — charts with one replica probe the arbitrary name `inference-extension`. With
--ha-enable-leader-election the names differ: `liveness` is always SERVING (a follower must not
be restarted), `readiness`, `""` and `envoy.service.ext_proc.v3.ExternalProcessor` are SERVING
only on the leader (live, leading, not draining), and any other name is SERVICE_UNKNOWN. While
draining after SIGTERM every check but liveness-with-leader-election says NOT_SERVING, so
Kubernetes stops sending new traffic while open streams finish. Watch is not implemented, as in
the Go EPP.
"""

from __future__ import annotations

from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
LIVENESS = "liveness"
READINESS = "readiness"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthService(health_pb2_grpc.HealthServicer):
    def __init__(self, live: Callable[[], bool], leader: Callable[[], bool] | None = None) -> None:
        self.live = live  # discovery synced
        self.leader = leader  # None: leader election disabled
        self.draining = False

    def status(self, service: str) -> int:
        live = self.live()
        if self.leader is None:
            return _SERVING if live and not self.draining else _NOT_SERVING
        if service == LIVENESS:
            return _SERVING
        if service in (READINESS, "", EXT_PROC_SERVICE):
            return _SERVING if live and self.leader() and not self.draining else _NOT_SERVING
        return _UNKNOWN

    def ready(self) -> bool:
        return self.status(READINESS) == _SERVING

    async def Check(self, request, context):  # noqa: N802 (gRPC name)
        return health_pb2.HealthCheckResponse(status=self.status(request.service))

    def list_response(self) -> health_pb2.HealthListResponse:
        services = [EXT_PROC_SERVICE] + ([LIVENESS, READINESS] if self.leader is not None else [])
        return health_pb2.HealthListResponse(statuses={s: health_pb2.HealthCheckResponse(status=self.status(s)) for s in services})

    async def List(self, request, context):  # noqa: N802
        return self.list_response()

    async def Watch(self, request, context):  # noqa: N802
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Watch is not implemented")


def add_to_server(service: HealthService, server: grpc.aio.Server) -> None:
    health_pb2_grpc.add_HealthServicer_to_server(service, server)
