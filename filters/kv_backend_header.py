"""Hard KV-backend choice from a request header (`x-kv-backend: nvlink|fs`): the A/B test switch.

A request carrying the header is only routed to endpoints whose `llm-d.ai/kv-backend` label
has that value. When no endpoint matches, the request fails with the filter named in the log
rather than silently landing on the other backend, because an A/B measurement must not mix.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from epp.datastore.endpoint import KV_BACKEND_LABEL, Endpoint
from epp.scheduling.framework import ConfigError, CycleState, LLMRequest
from epp.scheduling.registry import PluginContext, register

DEFAULT_HEADER = "x-kv-backend"


class KVBackendHeaderFilter:
    type_name = "kv-backend-header-filter"

    def __init__(self, name: str, header: str, label: str, allowed: frozenset[str] | None) -> None:
        self.name, self.header, self.label, self.allowed = name, header.lower(), label, allowed

    def filter(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        wanted = request.headers.get(self.header)
        if not wanted:
            return list(endpoints)
        wanted = wanted.strip().lower()
        if self.allowed is not None and wanted not in self.allowed:
            state.notes[self.name] = {"ignored_header": wanted, "allowed": sorted(self.allowed)}
            return list(endpoints)
        state.notes[self.name] = {"requested_backend": wanted}
        return [e for e in endpoints if e.labels.get(self.label, "").lower() == wanted]


@register("kv-backend-header-filter")
def _factory(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> KVBackendHeaderFilter:
    allowed = parameters.get("allowedValues")
    if allowed is not None and not isinstance(allowed, list):
        raise ConfigError(f"plugin {name!r}: allowedValues must be a list such as [nvlink, fs]")
    return KVBackendHeaderFilter(
        name,
        str(parameters.get("headerName", DEFAULT_HEADER)),
        str(parameters.get("labelKey", KV_BACKEND_LABEL)),
        frozenset(str(v).lower() for v in allowed) if allowed is not None else None,
    )
