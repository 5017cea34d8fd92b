"""The `Scoring decision` event: one per scheduled request, the fields people grep and summarise."""

from __future__ import annotations

import heapq
from typing import Any

from epp.scheduling.framework import LLMRequest, SchedulingError, SchedulingResult

DECISION_MSG = "Scoring decision"
FAILURE_MSG = "Scheduling failed"
FULL_DETAIL_MAX = 32  # above this many candidates only the best TOP_N are itemised
TOP_N = 16


def _profile_fields(result: SchedulingResult) -> dict[str, Any]:
    run = result.primary
    totals, keys = run.totals, run.scored_keys
    idx = range(len(keys))
    truncated = len(keys) > FULL_DETAIL_MAX
    if truncated:
        idx = heapq.nlargest(TOP_N, idx, key=totals.__getitem__)
    per_scorer = run.scores.items()
    out: dict[str, Any] = {
        "scheduling_profile": run.profile,
        "candidates": len(run.candidates),
        "scores": {keys[i]: {name: vals[i] for name, vals in per_scorer} for i in idx},
        "totals": {keys[i]: round(totals[i], 6) for i in idx},
        "picker": run.picker,
    }
    if truncated:
        out["scores_truncated_to"] = TOP_N
    if result.excluded:  # endpoint health left these out before any filter ran
        out["excluded"] = result.excluded
        if result.health_panic:
            out["health_panic"] = True  # too few were healthy: every candidate was used anyway
    if run.filtered_out:
        out["filtered_out"] = run.filtered_out
    if len(result.profile_results) > 1:
        out["profiles"] = {
            name: [e.hostport for e in r.targets] for name, r in result.profile_results.items() if name != run.profile
        }
    return out


def decision_fields(request: LLMRequest, result: SchedulingResult, config_profile: str | None) -> dict[str, Any]:
    """Fields of the `Scoring decision` event for a successful cycle."""
    targets = result.targets
    primary = targets[0]
    fields: dict[str, Any] = {
        "request_id": request.request_id,
        "model": request.model,
        "profile": config_profile or "custom",
        "prompt_tokens": request.prompt_tokens,
        **_profile_fields(result),
        # a list, primary first, as the Go EPP logs it (so `rg -o 'selected":\[[^]]+\]'` keeps working)
        "selected": [e.hostport for e in targets],
        "selected_name": primary.key,
        "kv_backend": primary.kv_backend or "none",
    }
    if request.target_model != request.model:
        fields["target_model"] = request.target_model
    if result.request_headers:
        fields["request_headers"] = result.request_headers  # what the EPP added for the pod's sidecar
    if result.notes:
        fields["notes"] = result.notes
    return fields


def failure_fields(request: LLMRequest | None, error: SchedulingError, config_profile: str | None) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "profile": config_profile or "custom",
        "error_code": error.code,
        "error": error.message,
    }
    if request is not None:
        fields.update(request_id=request.request_id, model=request.model, prompt_tokens=request.prompt_tokens)
    if error.result is not None and error.result.primary_profile in error.result.profile_results:
        fields.update(_profile_fields(error.result))
        if error.result.notes:
            fields["notes"] = error.result.notes
    return fields
