"""InferenceObjectives: the priority a request gets from the objective its header names.

llm-d reads the objective's name from `x-llm-d-inference-objective` (GIE: `x-gateway-inference-
objective`); its `spec.priority` (default 0; negative = sheddable) decides admission and the
flow-control band. Objectives come from Kubernetes (InferenceObjective resources of the pool) or,
without a cluster, from the endpoints file's `objectives:` list. An unknown name means priority 0.
"""

from __future__ import annotations

from typing import Iterable, Mapping

OBJECTIVE_HEADERS = ("x-llm-d-inference-objective", "x-gateway-inference-objective")
FAIRNESS_HEADERS = ("x-llm-d-inference-fairness-id", "x-gateway-inference-fairness-id")
DEFAULT_FAIRNESS_ID = "default-flow"
MAX_FAIRNESS_ID = 256  # a flow key longer than this is cut (it is only a grouping key)


class Objectives:
    def __init__(self) -> None:
        self._sources: dict[str, dict[str, int]] = {}
        self._merged: dict[str, int] = {}

    def replace(self, source: str, objectives: Iterable[tuple[str, int]]) -> None:
        """Make `source`'s objectives exactly these (a relist); other sources keep theirs."""
        self._sources[source] = dict(objectives)
        self._merge()

    def set(self, source: str, name: str, priority: int | None) -> None:
        entries = self._sources.setdefault(source, {})
        if priority is None:
            entries.pop(name, None)
        else:
            entries[name] = priority
        self._merge()

    def _merge(self) -> None:
        merged: dict[str, int] = {}
        for entries in self._sources.values():
            merged.update(entries)
        self._merged = merged

    def priority(self, name: str) -> int:
        return self._merged.get(name, 0)

    def any_sheddable(self) -> bool:
        return any(v < 0 for v in self._merged.values())

    def __len__(self) -> int:
        return len(self._merged)

    def for_request(self, headers: Mapping[str, str]) -> tuple[int, str]:
        """(priority, fairness ID) of a request from its headers."""
        name = next((headers[h] for h in OBJECTIVE_HEADERS if headers.get(h)), "")
        fairness = next((headers[h] for h in FAIRNESS_HEADERS if headers.get(h)), DEFAULT_FAIRNESS_ID)
        return (self._merged.get(name, 0) if name else 0), fairness[:MAX_FAIRNESS_ID]
