from expertflow.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrefetchSetup(_message.Message):
    __slots__ = ("moe_layers", "experts", "top_k", "policy")
    MOE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    moe_layers: int
    experts: int
    top_k: int
    policy: str
    def __init__(self, moe_layers: _Optional[int] = ..., experts: _Optional[int] = ..., top_k: _Optional[int] = ..., policy: _Optional[str] = ...) -> None: ...

class OrchestratorInfo(_message.Message):
    __slots__ = ("policy", "wants_speculation", "predictor", "plans_port", "plans_ticket", "plans_curve_key")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    WANTS_SPECULATION_FIELD_NUMBER: _ClassVar[int]
    PREDICTOR_FIELD_NUMBER: _ClassVar[int]
    PLANS_PORT_FIELD_NUMBER: _ClassVar[int]
    PLANS_TICKET_FIELD_NUMBER: _ClassVar[int]
    PLANS_CURVE_KEY_FIELD_NUMBER: _ClassVar[int]
    policy: str
    wants_speculation: bool
    predictor: str
    plans_port: int
    plans_ticket: str
    plans_curve_key: str
    def __init__(self, policy: _Optional[str] = ..., wants_speculation: _Optional[bool] = ..., predictor: _Optional[str] = ..., plans_port: _Optional[int] = ..., plans_ticket: _Optional[str] = ..., plans_curve_key: _Optional[str] = ...) -> None: ...

class InFlight(_message.Message):
    __slots__ = ("key", "eta_ms", "started")
    KEY_FIELD_NUMBER: _ClassVar[int]
    ETA_MS_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    key: _common_pb2.ExpertKey
    eta_ms: float
    started: bool
    def __init__(self, key: _Optional[_Union[_common_pb2.ExpertKey, _Mapping]] = ..., eta_ms: _Optional[float] = ..., started: _Optional[bool] = ...) -> None: ...

class CacheView(_message.Message):
    __slots__ = ("now_ms", "n_slots", "moe_layers", "experts", "resident", "in_flight", "pinned", "layer_ms", "transfer_ms", "link_busy", "sources", "source_ms")
    NOW_MS_FIELD_NUMBER: _ClassVar[int]
    N_SLOTS_FIELD_NUMBER: _ClassVar[int]
    MOE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    LAYER_MS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_MS_FIELD_NUMBER: _ClassVar[int]
    LINK_BUSY_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_MS_FIELD_NUMBER: _ClassVar[int]
    now_ms: float
    n_slots: int
    moe_layers: int
    experts: int
    resident: bytes
    in_flight: _containers.RepeatedCompositeFieldContainer[InFlight]
    pinned: _containers.RepeatedCompositeFieldContainer[_common_pb2.ExpertKey]
    layer_ms: _containers.RepeatedScalarFieldContainer[float]
    transfer_ms: float
    link_busy: float
    sources: bytes
    source_ms: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, now_ms: _Optional[float] = ..., n_slots: _Optional[int] = ..., moe_layers: _Optional[int] = ..., experts: _Optional[int] = ..., resident: _Optional[bytes] = ..., in_flight: _Optional[_Iterable[_Union[InFlight, _Mapping]]] = ..., pinned: _Optional[_Iterable[_Union[_common_pb2.ExpertKey, _Mapping]]] = ..., layer_ms: _Optional[_Iterable[float]] = ..., transfer_ms: _Optional[float] = ..., link_busy: _Optional[float] = ..., sources: _Optional[bytes] = ..., source_ms: _Optional[_Iterable[float]] = ...) -> None: ...

class Transfer(_message.Message):
    __slots__ = ("key", "deadline_ms", "eta_ms", "prob")
    KEY_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    ETA_MS_FIELD_NUMBER: _ClassVar[int]
    PROB_FIELD_NUMBER: _ClassVar[int]
    key: _common_pb2.ExpertKey
    deadline_ms: float
    eta_ms: float
    prob: float
    def __init__(self, key: _Optional[_Union[_common_pb2.ExpertKey, _Mapping]] = ..., deadline_ms: _Optional[float] = ..., eta_ms: _Optional[float] = ..., prob: _Optional[float] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("fetch", "cancel", "evict", "next_use_ms", "clear_next_use")
    FETCH_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    EVICT_FIELD_NUMBER: _ClassVar[int]
    NEXT_USE_MS_FIELD_NUMBER: _ClassVar[int]
    CLEAR_NEXT_USE_FIELD_NUMBER: _ClassVar[int]
    fetch: _containers.RepeatedCompositeFieldContainer[Transfer]
    cancel: _containers.RepeatedCompositeFieldContainer[_common_pb2.ExpertKey]
    evict: _containers.RepeatedCompositeFieldContainer[_common_pb2.ExpertKey]
    next_use_ms: _containers.RepeatedScalarFieldContainer[float]
    clear_next_use: bool
    def __init__(self, fetch: _Optional[_Iterable[_Union[Transfer, _Mapping]]] = ..., cancel: _Optional[_Iterable[_Union[_common_pb2.ExpertKey, _Mapping]]] = ..., evict: _Optional[_Iterable[_Union[_common_pb2.ExpertKey, _Mapping]]] = ..., next_use_ms: _Optional[_Iterable[float]] = ..., clear_next_use: _Optional[bool] = ...) -> None: ...

class BeginStepRequest(_message.Message):
    __slots__ = ("step", "requests", "view")
    STEP_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    step: int
    requests: _containers.RepeatedCompositeFieldContainer[_common_pb2.RequestTokens]
    view: CacheView
    def __init__(self, step: _Optional[int] = ..., requests: _Optional[_Iterable[_Union[_common_pb2.RequestTokens, _Mapping]]] = ..., view: _Optional[_Union[CacheView, _Mapping]] = ...) -> None: ...

class AfterLayerRequest(_message.Message):
    __slots__ = ("step", "layer", "routes", "view")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    step: int
    layer: int
    routes: _containers.RepeatedCompositeFieldContainer[_common_pb2.RequestRoutes]
    view: CacheView
    def __init__(self, step: _Optional[int] = ..., layer: _Optional[int] = ..., routes: _Optional[_Iterable[_Union[_common_pb2.RequestRoutes, _Mapping]]] = ..., view: _Optional[_Union[CacheView, _Mapping]] = ...) -> None: ...

class PrefetchEvent(_message.Message):
    __slots__ = ("begin_step", "after_layer", "finish", "setup")
    BEGIN_STEP_FIELD_NUMBER: _ClassVar[int]
    AFTER_LAYER_FIELD_NUMBER: _ClassVar[int]
    FINISH_FIELD_NUMBER: _ClassVar[int]
    SETUP_FIELD_NUMBER: _ClassVar[int]
    begin_step: BeginStepRequest
    after_layer: AfterLayerRequest
    finish: _common_pb2.FinishRequest
    setup: PrefetchSetup
    def __init__(self, begin_step: _Optional[_Union[BeginStepRequest, _Mapping]] = ..., after_layer: _Optional[_Union[AfterLayerRequest, _Mapping]] = ..., finish: _Optional[_Union[_common_pb2.FinishRequest, _Mapping]] = ..., setup: _Optional[_Union[PrefetchSetup, _Mapping]] = ...) -> None: ...

class PlanMessage(_message.Message):
    __slots__ = ("step", "layer", "has_plan", "plan")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HAS_PLAN_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    step: int
    layer: int
    has_plan: bool
    plan: Plan
    def __init__(self, step: _Optional[int] = ..., layer: _Optional[int] = ..., has_plan: _Optional[bool] = ..., plan: _Optional[_Union[Plan, _Mapping]] = ...) -> None: ...

class WaitingRequest(_message.Message):
    __slots__ = ("request_id", "waited")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    WAITED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    waited: int
    def __init__(self, request_id: _Optional[str] = ..., waited: _Optional[int] = ...) -> None: ...

class ScheduleRequest(_message.Message):
    __slots__ = ("queue", "batch", "max_wait", "scheduler")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    queue: _containers.RepeatedCompositeFieldContainer[WaitingRequest]
    batch: int
    max_wait: int
    scheduler: str
    def __init__(self, queue: _Optional[_Iterable[_Union[WaitingRequest, _Mapping]]] = ..., batch: _Optional[int] = ..., max_wait: _Optional[int] = ..., scheduler: _Optional[str] = ...) -> None: ...

class ScheduleResponse(_message.Message):
    __slots__ = ("request_ids",)
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_ids: _Optional[_Iterable[str]] = ...) -> None: ...
