"""The scheduling framework's types: ProfileHandler → Filter → Scorer → Picker.

This module is the contract between the framework and its plugins (`filters/`, `scorers/`,
the pickers and profile handlers). Plugins import from here; the framework never imports a
plugin module directly, it finds plugin factories by type name in `epp.scheduling.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

from epp.datastore.endpoint import Endpoint


@dataclass(slots=True)
class LLMRequest:
    """One parsed inference request, as plugins see it."""

    request_id: str
    model: str  # the model the client asked for
    target_model: str  # after x-gateway-model-name-rewrite (== model when not rewritten)
    api: str  # "completions" | "chat/completions" | "embeddings" | "responses" | "conversations"
    prompt_tokens: int  # estimate (chars/4 of the user input), never 0 for a non-empty prompt
    stream: bool = False
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-cased names
    body: Mapping[str, Any] | None = None
    body_size: int = 0
    max_tokens: int | None = None  # requested output budget, if any
    prompt_text: str = ""  # the flattened user input (for prefix hashing); may be truncated
    priority: int = 0  # from the request's InferenceObjective; negative = sheddable
    fairness_id: str = "default-flow"  # flow-control flow (x-llm-d-inference-fairness-id)


# CycleState keys that plugins of different kinds share (so none of them imports another).
STAGE_KEY = "disagg-stage"  # "decode" | "prefill" | "encode": the stage whose profile runs now (disagg handlers)
PEER_ENDPOINT_KEY = "peer-endpoint"  # the endpoint an earlier stage picked (llm-d's peer-endpoint attribute)


class CycleState:
    """Scratch space shared by the plugins of one scheduling cycle (one request)."""

    __slots__ = ("_data", "notes", "candidates")

    def __init__(self, candidates: Sequence[Endpoint] = ()) -> None:
        self._data: dict[str, Any] = {}
        # Free-form, per-plugin notes that end up in the "Scoring decision" log event
        # (e.g. {"transfer-bandwidth-scorer": {"no_profile": ["ep-a"]}}).
        self.notes: dict[str, Any] = {}
        # Every endpoint the cycle started from: a pair-aware plugin in one profile looks at the
        # endpoints another profile will choose from (a decode's possible prefill peers).
        self.candidates: Sequence[Endpoint] = candidates

    def read(self, key: str, default: Any = None) -> Any:
        return self._data.get(key, default)

    def write(self, key: str, value: Any) -> None:
        self._data[key] = value


@runtime_checkable
class Plugin(Protocol):
    type_name: str  # the registered type, e.g. "active-request-scorer"
    name: str  # the instance name from the config (defaults to type_name)


@runtime_checkable
class Filter(Plugin, Protocol):
    def filter(
        self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]
    ) -> list[Endpoint]: ...


@runtime_checkable
class Scorer(Plugin, Protocol):
    def score(
        self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]
    ) -> Sequence[float]:
        """One raw score per endpoint, aligned with `endpoints`. Clamped to [0,1] by the framework."""
        ...


@dataclass(slots=True)
class ScoredEndpoint:
    endpoint: Endpoint
    score: float


@runtime_checkable
class Picker(Plugin, Protocol):
    def pick(
        self, state: CycleState, request: LLMRequest, scored: Sequence[ScoredEndpoint]
    ) -> list[Endpoint]:
        """Ordered picks, primary first (at most the picker's maxNumOfEndpoints)."""
        ...


@dataclass(slots=True)
class WeightedScorer:
    scorer: Scorer
    weight: float = 1.0


@dataclass(slots=True)
class SchedulerProfile:
    name: str
    filters: list[Filter] = field(default_factory=list)
    scorers: list[WeightedScorer] = field(default_factory=list)
    picker: Picker | None = None


@dataclass(slots=True)
class ProfileRunResult:
    """What one profile produced, including everything the decision log shows.

    Scores are kept as lists aligned with `scored_keys` (cheap on the hot path); the per-endpoint
    dicts `raw_scores` and `weighted_totals` are built only when something reads them.
    """

    profile: str
    targets: list[Endpoint]  # picked, primary first; empty when the profile failed
    candidates: list[Endpoint]  # the endpoints the profile started from
    filtered_out: dict[str, list[str]] = field(default_factory=dict)  # filter name -> endpoint keys
    scored_keys: list[str] = field(default_factory=list)  # endpoint keys that reached the scorers
    scores: dict[str, list[float]] = field(default_factory=dict)  # scorer name -> clamped raw score per scored key
    totals: list[float] = field(default_factory=list)  # Σ weight × clamped score per scored key
    picker: str = ""
    error: str | None = None

    @property
    def raw_scores(self) -> dict[str, dict[str, float]]:
        """scorer name -> endpoint key -> raw score (clamped to [0, 1])."""
        return {name: dict(zip(self.scored_keys, vals)) for name, vals in self.scores.items()}

    @property
    def weighted_totals(self) -> dict[str, float]:
        """endpoint key -> Σ weight × clamped score."""
        return dict(zip(self.scored_keys, self.totals))


@dataclass(slots=True)
class SchedulingResult:
    primary_profile: str
    profile_results: dict[str, ProfileRunResult]
    notes: dict[str, Any] = field(default_factory=dict)  # CycleState.notes of the cycle (for the decision log)
    # Headers the EPP adds to the forwarded request, written by PreRequest plugins (e.g. the
    # disagg handler's x-prefiller-host-port). The destination header is the handler's alone.
    request_headers: dict[str, str] = field(default_factory=dict)
    # Disaggregation stage -> the profile that served it ({"decode": "decode", "prefill": "prefill"}).
    stages: dict[str, str] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)  # endpoint key -> why endpoint health left it out
    health_panic: bool = False  # too few healthy endpoints: all candidates were used (Envoy's panic mode)
    state: CycleState | None = None  # the cycle's scratch space, so PreRequest hooks see what producers computed

    @property
    def primary(self) -> ProfileRunResult:
        return self.profile_results[self.primary_profile]

    @property
    def targets(self) -> list[Endpoint]:
        return self.primary.targets

    def stage_target(self, stage: str) -> Endpoint | None:
        """The first pick of a disaggregation stage ("prefill", "encode", …), if that stage ran and picked one."""
        run = self.profile_results.get(self.stages.get(stage, ""))
        return run.targets[0] if run is not None and run.targets else None


@runtime_checkable
class ProfileHandler(Plugin, Protocol):
    def pick_profiles(
        self,
        state: CycleState,
        request: LLMRequest,
        profiles: Mapping[str, SchedulerProfile],
        results: Mapping[str, ProfileRunResult],
    ) -> list[SchedulerProfile]:
        """Profiles to run next; an empty list ends the scheduling loop."""
        ...

    def process_results(
        self, state: CycleState, request: LLMRequest, results: Mapping[str, ProfileRunResult]
    ) -> SchedulingResult: ...


# -- request lifecycle hooks (optional; a plugin implementing them is called automatically) ----


@runtime_checkable
class DataProducer(Plugin, Protocol):
    def produce(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> None:
        """Called once per cycle before any profile runs (llm-d's PrepareRequestData), with every candidate.

        Leaves per-endpoint data in `state` for filters and scorers (e.g. prefix-cache matches).
        A producer with `produce_order` < 10 runs before the others (token producers use 0).
        """
        ...


@runtime_checkable
class Background(Protocol):
    """A plugin with work outside the request path (e.g. a KV-event subscriber thread).

    The running EPP starts it once endpoints are being discovered and stops it on shutdown;
    building a config (`epp profiles validate`, tests) never does.
    """

    def start_background(self, datastore: Any) -> None: ...

    def stop_background(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ProducerWanted:
    """What a consumer reads: a producer type, and optionally which instance and with which parameters."""

    type: str
    name: str | None = None  # a producer instance, or another consumer whose producer to share
    parameters: Mapping[str, Any] | None = None  # for the producer created when none is configured
    name_optional: bool = False  # a defaulted name: if no plugin has it, resolve as if no name was given


@runtime_checkable
class ProducerConsumer(Protocol):
    """A plugin that reads a producer's data; the config builder binds it to its producer.

    A named instance must exist; without a name the first configured producer of the type is
    used, or one is created (with the consumer's parameters, if any), as llm-d does.
    """

    def producer_wanted(self) -> ProducerWanted: ...

    def bind_producer(self, producer: Any) -> None: ...


@runtime_checkable
class PreRequest(Protocol):
    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> None:
        """Called once the request is scheduled and about to be forwarded."""
        ...


@runtime_checkable
class ResponseComplete(Protocol):
    def response_complete(self, request: LLMRequest, result: SchedulingResult, outcome: str) -> None:
        """Called exactly once per scheduled request when it ends.

        `outcome` is one of "success", "error" (a 5xx, the gateway's 502/503/504 for an endpoint it
        could not reach, or no response in time: the endpoint failed), "client_error" (a 4xx: the
        request's fault), "cancelled" (client disconnect or stream reset) or "timeout".
        """
        ...


@runtime_checkable
class CandidateGate(Plugin, Protocol):
    """Decides, for the whole pool and before any profile runs, which endpoints may be candidates.

    Listed under `plugins` only (endpoint health is one); never referenced from a profile.
    """

    def admit(self, endpoints: Sequence[Endpoint]) -> Any: ...


class SchedulingError(Exception):
    """Scheduling failed; `code` is a GIE error code (ResourceExhausted, ServiceUnavailable, …)."""

    def __init__(self, code: str, message: str, result: "SchedulingResult | None" = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.result = result  # what the profiles did before failing (filters that emptied the set, …)


class ConfigError(ValueError):
    """A plugin or profile configuration is invalid; the message tells the user what to change."""
