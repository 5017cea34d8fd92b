"""The admission and flow-control contract between the framework and its plugins.

Saturation detectors, fairness, ordering and usage-limit policies are plugins (registered by type
name like filters and scorers); the director and the flow controller only see these protocols.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from epp.datastore.endpoint import Endpoint

DEFAULT_FAIRNESS_ID = "default-flow"


@runtime_checkable
class SaturationDetector(Protocol):
    """Pool saturation over the candidates: < 1.0 has room, >= 1.0 is saturated (llm-d's contract)."""

    type_name: str
    name: str

    def saturation(self, endpoints: Sequence[Endpoint]) -> float: ...


@runtime_checkable
class FairnessPolicy(Protocol):
    """Chooses which flow (fairness ID) of a priority band dispatches next."""

    type_name: str
    name: str

    def pick_flow(self, flows: Sequence["FlowView"]) -> int:
        """Index into `flows` (each non-empty) of the flow to dispatch from."""
        ...


@runtime_checkable
class OrderingPolicy(Protocol):
    """Orders the requests inside one flow."""

    type_name: str
    name: str
    fifo: bool  # the only order implemented here: first come, first served


@runtime_checkable
class UsageLimitPolicy(Protocol):
    """The saturation below which a band may dispatch."""

    type_name: str
    name: str

    def limit(self, priority: int) -> float: ...


class FlowView(Protocol):
    """What a fairness policy may look at in a flow: its ID and the enqueue time of its head."""

    fairness_id: str

    def head_enqueued_at(self) -> float: ...
