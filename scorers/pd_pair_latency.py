"""pd-pair-latency-scorer: score P/D candidates by the predicted latency of the pair they would form.

Under a disagg profile handler a request is served by a pair — a prefill pod, the link its KV
cache crosses, a decode pod — or by the decode pod alone. This scorer predicts every route's
latency with `epp.scheduling.pair_latency` (the predicted-latency model, per pair) and scores
each candidate of the stage that runs by its best route:

* decode stage, decode first: a decode pod scores by min(prefill on itself, best prefill peer
  over its links) — so the decode pick already accounts for the fabric behind it;
* prefill stage after the decode pick: a prefill pod scores by its route into that decode pod;
* prefill-first order: a prefill pod scores by its best decode peer, then the decode stage by
  the route from the prefill pick.

score(candidate) = lowest cost among the candidates / candidate's cost, as predicted-latency.
Use one instance in both profiles: it books each routed request once (PreRequest) and learns
per route when the request ends. The estimates are in the decision log.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from epp.datastore.endpoint import Endpoint, can_decode, can_prefill
from epp.scheduling.framework import PEER_ENDPOINT_KEY, STAGE_KEY, ConfigError, CycleState, LLMRequest, SchedulingResult
from epp.scheduling.pair_latency import NOTE_LIMIT, PairLatencyModel, RouteEstimate, pair_model_from
from epp.scheduling.registry import PluginContext, register


class PDPairLatencyScorer:
    type_name = "pd-pair-latency-scorer"
    needs_metrics = True

    def __init__(self, name: str, model: PairLatencyModel, local_prefill: bool = True) -> None:
        self.name = name
        self.pair_model = model  # read by cost-based-pd-decider (shared bookings and calibration)
        self.local_prefill = local_prefill

    def routes(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[RouteEstimate | None]:
        """The best route each candidate would take in the stage that runs now."""
        m = self.pair_model
        stage = state.read(STAGE_KEY)
        peer: Endpoint | None = state.read(PEER_ENDPOINT_KEY)
        if stage == "prefill" and peer is not None:  # decode picked: the route from each prefill pod into it
            return [m.pair(state, request, p, peer) for p in endpoints]
        if stage == "decode" and peer is not None:  # prefill picked first: the route from it into each decode pod
            return [m.pair(state, request, peer, d) for d in endpoints]
        if stage == "prefill":  # prefill first: each prefill pod's best decode peer
            decodes = [d for d in state.candidates if can_decode(d)]
            return [m.best_pair_from(state, request, p, decodes) for p in endpoints]
        if stage is None:  # no disagg handler: every request prefills where it decodes
            return [m.local(state, request, d) for d in endpoints]
        prefills = [p for p in state.candidates if can_prefill(p)]
        out = []
        for d in endpoints:
            remote = m.best_pair_into(state, request, d, prefills)
            local = m.local(state, request, d) if self.local_prefill or remote is None else None
            out.append(remote if local is None or (remote is not None and remote.cost < local.cost) else local)
        return out

    def score(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        routes = self.routes(state, request, endpoints)
        costs = [r.cost if r is not None else math.inf for r in routes]
        low = min(costs, default=math.inf)
        self._note(state, endpoints, routes)
        if not math.isfinite(low):
            return [0.0] * len(endpoints)
        return [1.0 if low <= 0 else low / c for c in costs]

    def _note(self, state: CycleState, endpoints: Sequence[Endpoint], routes: Sequence[RouteEstimate | None]) -> None:
        ranked = sorted((r.cost, e.key, r) for e, r in zip(endpoints, routes) if r is not None)[:NOTE_LIMIT]
        note: dict[str, Any] = {"stage": state.read(STAGE_KEY) or "single"}
        note["routes"] = {key: {"via": _route_name(r), **r.summary()} for _, key, r in ranked}
        missing = [e.key for e, r in zip(endpoints, routes) if r is None]
        if missing:
            note["no_usable_link"] = missing[:NOTE_LIMIT]
        state.notes.setdefault(self.name, {})[note["stage"]] = note

    # -- lifecycle --------------------------------------------------------------------------------
    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        self.pair_model.book(request, result.stage_target("prefill"), result.targets[0])

    def response_complete(self, request: LLMRequest, result: SchedulingResult | None, outcome: str) -> None:
        self.pair_model.release(request, outcome)


def _route_name(r: RouteEstimate) -> str:
    return f"{r.prefill_on.key} -> {r.decode_on.key}" if r.remote else f"local on {r.decode_on.key}"


@register("pd-pair-latency-scorer")
def _factory(name: str, parameters: Mapping[str, Any], ctx: PluginContext) -> PDPairLatencyScorer:
    local = parameters.get("localPrefill", True)
    if not isinstance(local, bool):
        raise ConfigError(f"plugin {name!r}: localPrefill must be true or false, got {local!r}")
    params = {k: v for k, v in parameters.items() if k != "localPrefill"}
    return PDPairLatencyScorer(name, pair_model_from(name, params, ctx), local)
