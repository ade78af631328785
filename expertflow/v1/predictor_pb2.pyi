from expertflow.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PredictorInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PredictorInfo(_message.Message):
    __slots__ = ("moe_layers", "experts", "label")
    MOE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    moe_layers: int
    experts: int
    label: str
    def __init__(self, moe_layers: _Optional[int] = ..., experts: _Optional[int] = ..., label: _Optional[str] = ...) -> None: ...

class PredictStepRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[_common_pb2.RequestTokens]
    def __init__(self, requests: _Optional[_Iterable[_Union[_common_pb2.RequestTokens, _Mapping]]] = ...) -> None: ...

class PredictStepResponse(_message.Message):
    __slots__ = ("predictions",)
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[_common_pb2.RequestProbabilities]
    def __init__(self, predictions: _Optional[_Iterable[_Union[_common_pb2.RequestProbabilities, _Mapping]]] = ...) -> None: ...

class PredictLayerRequest(_message.Message):
    __slots__ = ("layer", "routes")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    layer: int
    routes: _containers.RepeatedCompositeFieldContainer[_common_pb2.RequestRoutes]
    def __init__(self, layer: _Optional[int] = ..., routes: _Optional[_Iterable[_Union[_common_pb2.RequestRoutes, _Mapping]]] = ...) -> None: ...

class PredictLayerResponse(_message.Message):
    __slots__ = ("refined",)
    REFINED_FIELD_NUMBER: _ClassVar[int]
    refined: _containers.RepeatedCompositeFieldContainer[_common_pb2.RequestProbabilities]
    def __init__(self, refined: _Optional[_Iterable[_Union[_common_pb2.RequestProbabilities, _Mapping]]] = ...) -> None: ...
