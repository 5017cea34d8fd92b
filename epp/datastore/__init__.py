"""Endpoints known to the EPP: identity from discovery, live metrics from the scraper."""

from epp.datastore.datastore import Datastore
from epp.datastore.endpoint import (
    KV_BACKEND_LABEL,
    ROLE_LABEL,
    Endpoint,
    EndpointMetrics,
    TransferProfile,
)

__all__ = [
    "Datastore",
    "Endpoint",
    "EndpointMetrics",
    "TransferProfile",
    "KV_BACKEND_LABEL",
    "ROLE_LABEL",
]
