"""EndpointPickerAdmin: a read-only view of the datastore and the loaded configuration."""

from __future__ import annotations

import time
from typing import Any

from epp.admin.v1 import admin_pb2 as pb
from epp.admin.v1 import admin_pb2_grpc as pb_grpc
from epp.datastore import Datastore, Endpoint


def health_info(snap: dict[str, Any]) -> pb.EndpointHealth:
    h = pb.EndpointHealth(state=snap["state"], readiness_detail=snap["readiness"] or "", ejection_reason=snap.get("ejection_reason", ""),
                          ejection_detail=snap.get("ejection_detail", ""), ejected_for_seconds=snap.get("ejected_for_seconds", 0.0),
                          ejections=snap["ejections"], outcomes=snap["outcomes"], consecutive_5xx=snap["consecutive_5xx"],
                          consecutive_gateway_failures=snap["consecutive_gateway_failures"], last_failure=snap.get("last_failure", ""),
                          trial_in_flight=bool(snap.get("trial_in_flight")))
    if snap["ready"] is not None:
        h.ready = snap["ready"]
    for field in ("last_failure_age_seconds", "ttfb_seconds"):
        if field in snap:
            setattr(h, field, snap[field])
    for role, v in (snap.get("instances") or {}).items():
        h.instances[role].up, h.instances[role].total = v["up"], v["total"]
    return h


def endpoint_info(e: Endpoint, now: float, health: Any = None) -> pb.EndpointInfo:
    m = e.metrics
    info = pb.EndpointInfo(name=e.key, address=e.address, port=e.port, labels=dict(e.labels), kv_backend=e.kv_backend,
                           scrape_error=m.error or "")
    if m.updated_at > 0:
        info.metrics_age_seconds = m.age(now)
    for field in ("waiting", "running", "kv_cache_usage", "prefill_tokens_per_second", "decode_seconds_per_token"):
        value = getattr(m, field)
        if value is not None:
            setattr(info, field, float(value))
    if m.transfer_profile is not None:
        prof = m.transfer_profile
        info.transfer_profile.extend(pb.TransferPoint(blocks=b, seconds=s) for b, s in zip(prof.blocks, prof.seconds))
        info.transfer_block_tokens = prof.block_tokens
    snap = health.snapshot(e.key) if health is not None else None
    if snap is not None:
        info.health.CopyFrom(health_info(snap))
    return info


class AdminService(pb_grpc.EndpointPickerAdminServicer):
    def __init__(self, datastore: Datastore, loaded: Any, scheduler: Any, health: Any = None) -> None:
        self.datastore, self.loaded, self.scheduler, self.health = datastore, loaded, scheduler, health

    async def ListEndpoints(self, request, context):  # noqa: N802 (gRPC name)
        now = time.monotonic()
        return pb.ListEndpointsResponse(endpoints=[endpoint_info(e, now, self.health) for e in self.datastore.endpoints()],
                                        synced=self.datastore.synced)

    async def DescribeScheduler(self, request, context):  # noqa: N802
        desc = self.scheduler.describe()
        return pb.SchedulerDescription(
            config_profile=self.loaded.profile or "",
            source=self.loaded.source,
            config_yaml=self.loaded.text,
            profile_handler=desc["profileHandler"],
            profiles=[
                pb.ProfileDescription(name=name, filters=p["filters"], picker=p["picker"] or "",
                                      scorers=[pb.WeightedScorer(name=s["name"], weight=s["weight"]) for s in p["scorers"]])
                for name, p in desc["profiles"].items()
            ],
        )


def add_to_server(servicer: AdminService, server) -> None:
    pb_grpc.add_EndpointPickerAdminServicer_to_server(servicer, server)
