"""Runs one scheduling cycle: ProfileHandler → (Filter* → Scorer* → Picker) per profile.

The hot path of the EPP: everything here runs once per request, so it avoids per-call
allocation beyond what the decision log needs (raw and weighted scores per endpoint).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

from epp.datastore.endpoint import Endpoint
from epp.observability.logging import get_logger
from epp.scheduling.framework import (
    CycleState,
    DataProducer,
    LLMRequest,
    PreRequest,
    ProfileHandler,
    ProfileRunResult,
    ResponseComplete,
    SchedulerProfile,
    SchedulingError,
    SchedulingResult,
    ScoredEndpoint,
)

# (extension_point, plugin_type, plugin_name, seconds)
Observer = Callable[[str, str, str, float], None]

NO_CANDIDATES = "failed to find endpoint candidates for serving the request"

_log = get_logger("epp.scheduler")


class Scheduler:
    def __init__(
        self,
        profile_handler: ProfileHandler,
        profiles: Mapping[str, SchedulerProfile],
        *,
        plugins: Sequence[Any] = (),
        observer: Observer | None = None,
    ) -> None:
        if not profiles:
            raise ValueError("a scheduler needs at least one scheduling profile")
        self.profile_handler = profile_handler
        self.profiles = dict(profiles)
        self.observer = observer
        every = list(plugins) or self._plugins_of_profiles()
        producers = [p for p in every if isinstance(p, DataProducer)]
        self._producers = sorted(producers, key=lambda p: getattr(p, "produce_order", 10))  # stable: config order within a stage
        self._pre_request = [p for p in every if isinstance(p, PreRequest)]
        self._response_complete = [p for p in every if isinstance(p, ResponseComplete)]

    def _plugins_of_profiles(self) -> list[Any]:
        seen: dict[int, Any] = {id(self.profile_handler): self.profile_handler}
        for prof in self.profiles.values():
            for p in (*prof.filters, *(w.scorer for w in prof.scorers), prof.picker):
                if p is not None:
                    seen.setdefault(id(p), p)
        return list(seen.values())

    # -- the cycle ------------------------------------------------------------------------------
    def schedule(self, request: LLMRequest, candidates: Sequence[Endpoint]) -> SchedulingResult:
        if not candidates:
            raise SchedulingError("ServiceUnavailable", NO_CANDIDATES)
        state = CycleState(candidates)
        results: dict[str, ProfileRunResult] = {}
        obs = self.observer
        handler = self.profile_handler
        for producer in self._producers:
            self._call("PrepareData", producer, producer.produce, state, request, candidates)
        while True:
            t0 = time.perf_counter() if obs else 0.0
            todo = handler.pick_profiles(state, request, self.profiles, results)
            if obs:
                obs("ProfilePicker", handler.type_name, handler.name, time.perf_counter() - t0)
            if not todo:
                break
            for prof in todo:
                results[prof.name] = self._run_profile(prof, state, request, candidates)
        t0 = time.perf_counter() if obs else 0.0
        result = handler.process_results(state, request, results)
        if obs:
            obs("ProcessProfilesResults", handler.type_name, handler.name, time.perf_counter() - t0)
        result.notes = state.notes
        result.state = state
        primary = result.profile_results.get(result.primary_profile)
        if primary is None or not primary.targets:
            reason = primary.error if primary is not None and primary.error else "no endpoint left after filtering"
            raise SchedulingError("ResourceExhausted", f"failed to find target endpoint: {reason}", result)
        return result

    def _run_profile(
        self, prof: SchedulerProfile, state: CycleState, request: LLMRequest, candidates: Sequence[Endpoint]
    ) -> ProfileRunResult:
        obs = self.observer
        run = ProfileRunResult(profile=prof.name, targets=[], candidates=list(candidates))
        endpoints: Sequence[Endpoint] = candidates
        for flt in prof.filters:
            t0 = time.perf_counter()
            kept = flt.filter(state, request, endpoints)
            if obs:
                obs("Filter", flt.type_name, flt.name, time.perf_counter() - t0)
            if len(kept) != len(endpoints):
                keep = {id(e) for e in kept}
                run.filtered_out[flt.name] = [e.key for e in endpoints if id(e) not in keep]
            endpoints = kept
            if not endpoints:
                run.error = f"filter {flt.name!r} removed every endpoint"
                return run
        keys = [e.key for e in endpoints]
        totals = [0.0] * len(endpoints)
        for ws in prof.scorers:
            scorer = ws.scorer
            t0 = time.perf_counter()
            raw = scorer.score(state, request, endpoints)
            if obs:
                obs("Scorer", scorer.type_name, scorer.name, time.perf_counter() - t0)
            if len(raw) != len(endpoints):
                raise SchedulingError(
                    "Internal", f"scorer {scorer.name!r} returned {len(raw)} scores for {len(endpoints)} endpoints"
                )
            # clamp to [0,1]; NaN fails `x > 0.0` and counts as 0
            clamped = [(1.0 if x > 1.0 else x) if x > 0.0 else 0.0 for x in raw]
            w = ws.weight
            totals = [t + c for t, c in zip(totals, clamped)] if w == 1.0 else [t + w * c for t, c in zip(totals, clamped)]
            run.scores[scorer.name] = clamped
        run.scored_keys = keys
        run.totals = totals
        picker = prof.picker
        if picker is None:
            run.error = f"profile {prof.name!r} has no picker"
            return run
        run.picker = picker.name
        t0 = time.perf_counter()
        fast = getattr(picker, "pick_totals", None)
        if fast is not None:  # pickers that can work on parallel lists skip building ScoredEndpoints
            run.targets = fast(state, request, endpoints, totals)
        else:
            run.targets = picker.pick(state, request, [ScoredEndpoint(e, t) for e, t in zip(endpoints, totals)])
        if obs:
            obs("Picker", picker.type_name, picker.name, time.perf_counter() - t0)
        if not run.targets:
            run.error = f"picker {picker.name!r} picked nothing"
        return run

    # -- request lifecycle ----------------------------------------------------------------------
    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        for plugin in self._pre_request:
            self._call("PreRequest", plugin, plugin.pre_request, request, result)

    def response_complete(self, request: LLMRequest, result: SchedulingResult, outcome: str) -> None:
        for plugin in self._response_complete:
            self._call("ResponseComplete", plugin, plugin.response_complete, request, result, outcome)

    def _call(self, point: str, plugin: Any, fn: Callable[..., None], *args: Any) -> None:
        t0 = time.perf_counter()
        try:
            fn(*args)
        except Exception:  # a plugin bug must never break the request path
            _log.exception("plugin hook failed", extension_point=point, plugin=getattr(plugin, "name", "?"))
        if self.observer:
            self.observer(point, plugin.type_name, plugin.name, time.perf_counter() - t0)

    def describe(self) -> dict[str, Any]:
        """The shape logged at startup (profile → filters, scorers with weights, picker; the data producers)."""
        out: dict[str, Any] = {
            "profileHandler": self.profile_handler.name,
            "profiles": {
                name: {
                    "filters": [f.name for f in p.filters],
                    "scorers": [{"name": w.scorer.name, "weight": w.weight} for w in p.scorers],
                    "picker": p.picker.name if p.picker else None,
                }
                for name, p in self.profiles.items()
            },
        }
        if self._producers:
            out["producers"] = [p.name for p in self._producers]
        return out
