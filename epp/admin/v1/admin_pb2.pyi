from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListEndpointsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TransferPoint(_message.Message):
    __slots__ = ("blocks", "seconds")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    blocks: int
    seconds: float
    def __init__(self, blocks: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class EndpointInfo(_message.Message):
    __slots__ = ("name", "address", "port", "labels", "kv_backend", "metrics_age_seconds", "waiting", "running", "kv_cache_usage", "prefill_tokens_per_second", "decode_seconds_per_token", "transfer_profile", "transfer_block_tokens", "scrape_error", "health")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    KV_BACKEND_FIELD_NUMBER: _ClassVar[int]
    METRICS_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_USAGE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_PROFILE_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SCRAPE_ERROR_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    port: int
    labels: _containers.ScalarMap[str, str]
    kv_backend: str
    metrics_age_seconds: float
    waiting: float
    running: float
    kv_cache_usage: float
    prefill_tokens_per_second: float
    decode_seconds_per_token: float
    transfer_profile: _containers.RepeatedCompositeFieldContainer[TransferPoint]
    transfer_block_tokens: int
    scrape_error: str
    health: EndpointHealth
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., port: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., kv_backend: _Optional[str] = ..., metrics_age_seconds: _Optional[float] = ..., waiting: _Optional[float] = ..., running: _Optional[float] = ..., kv_cache_usage: _Optional[float] = ..., prefill_tokens_per_second: _Optional[float] = ..., decode_seconds_per_token: _Optional[float] = ..., transfer_profile: _Optional[_Iterable[_Union[TransferPoint, _Mapping]]] = ..., transfer_block_tokens: _Optional[int] = ..., scrape_error: _Optional[str] = ..., health: _Optional[_Union[EndpointHealth, _Mapping]] = ...) -> None: ...

class InstancesUp(_message.Message):
    __slots__ = ("up", "total")
    UP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    up: int
    total: int
    def __init__(self, up: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class EndpointHealth(_message.Message):
    __slots__ = ("state", "ready", "readiness_detail", "ejection_reason", "ejection_detail", "ejected_for_seconds", "ejections", "outcomes", "consecutive_5xx", "consecutive_gateway_failures", "last_failure", "last_failure_age_seconds", "ttfb_seconds", "instances", "trial_in_flight")
    class EjectionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class OutcomesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class InstancesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: InstancesUp
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[InstancesUp, _Mapping]] = ...) -> None: ...
    STATE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    READINESS_DETAIL_FIELD_NUMBER: _ClassVar[int]
    EJECTION_REASON_FIELD_NUMBER: _ClassVar[int]
    EJECTION_DETAIL_FIELD_NUMBER: _ClassVar[int]
    EJECTED_FOR_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EJECTIONS_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    CONSECUTIVE_5XX_FIELD_NUMBER: _ClassVar[int]
    CONSECUTIVE_GATEWAY_FAILURES_FIELD_NUMBER: _ClassVar[int]
    LAST_FAILURE_FIELD_NUMBER: _ClassVar[int]
    LAST_FAILURE_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TTFB_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    TRIAL_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    state: str
    ready: bool
    readiness_detail: str
    ejection_reason: str
    ejection_detail: str
    ejected_for_seconds: float
    ejections: _containers.ScalarMap[str, int]
    outcomes: _containers.ScalarMap[str, int]
    consecutive_5xx: int
    consecutive_gateway_failures: int
    last_failure: str
    last_failure_age_seconds: float
    ttfb_seconds: float
    instances: _containers.MessageMap[str, InstancesUp]
    trial_in_flight: bool
    def __init__(self, state: _Optional[str] = ..., ready: _Optional[bool] = ..., readiness_detail: _Optional[str] = ..., ejection_reason: _Optional[str] = ..., ejection_detail: _Optional[str] = ..., ejected_for_seconds: _Optional[float] = ..., ejections: _Optional[_Mapping[str, int]] = ..., outcomes: _Optional[_Mapping[str, int]] = ..., consecutive_5xx: _Optional[int] = ..., consecutive_gateway_failures: _Optional[int] = ..., last_failure: _Optional[str] = ..., last_failure_age_seconds: _Optional[float] = ..., ttfb_seconds: _Optional[float] = ..., instances: _Optional[_Mapping[str, InstancesUp]] = ..., trial_in_flight: _Optional[bool] = ...) -> None: ...

class ListEndpointsResponse(_message.Message):
    __slots__ = ("endpoints", "synced")
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    SYNCED_FIELD_NUMBER: _ClassVar[int]
    endpoints: _containers.RepeatedCompositeFieldContainer[EndpointInfo]
    synced: bool
    def __init__(self, endpoints: _Optional[_Iterable[_Union[EndpointInfo, _Mapping]]] = ..., synced: _Optional[bool] = ...) -> None: ...

class DescribeSchedulerRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WeightedScorer(_message.Message):
    __slots__ = ("name", "weight")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    name: str
    weight: float
    def __init__(self, name: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class ProfileDescription(_message.Message):
    __slots__ = ("name", "filters", "scorers", "picker")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    SCORERS_FIELD_NUMBER: _ClassVar[int]
    PICKER_FIELD_NUMBER: _ClassVar[int]
    name: str
    filters: _containers.RepeatedScalarFieldContainer[str]
    scorers: _containers.RepeatedCompositeFieldContainer[WeightedScorer]
    picker: str
    def __init__(self, name: _Optional[str] = ..., filters: _Optional[_Iterable[str]] = ..., scorers: _Optional[_Iterable[_Union[WeightedScorer, _Mapping]]] = ..., picker: _Optional[str] = ...) -> None: ...

class SchedulerDescription(_message.Message):
    __slots__ = ("config_profile", "source", "config_yaml", "profile_handler", "profiles")
    CONFIG_PROFILE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_YAML_FIELD_NUMBER: _ClassVar[int]
    PROFILE_HANDLER_FIELD_NUMBER: _ClassVar[int]
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    config_profile: str
    source: str
    config_yaml: str
    profile_handler: str
    profiles: _containers.RepeatedCompositeFieldContainer[ProfileDescription]
    def __init__(self, config_profile: _Optional[str] = ..., source: _Optional[str] = ..., config_yaml: _Optional[str] = ..., profile_handler: _Optional[str] = ..., profiles: _Optional[_Iterable[_Union[ProfileDescription, _Mapping]]] = ...) -> None: ...
