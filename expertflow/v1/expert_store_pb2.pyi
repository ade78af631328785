from expertflow.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LayoutRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Layout(_message.Message):
    __slots__ = ("hidden", "ffn", "dtype", "padded_numel", "nbytes", "slot_nbytes", "model", "model_version", "moe_layers", "experts")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    FFN_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PADDED_NUMEL_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    SLOT_NBYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MOE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    hidden: int
    ffn: int
    dtype: str
    padded_numel: int
    nbytes: int
    slot_nbytes: int
    model: str
    model_version: str
    moe_layers: int
    experts: int
    def __init__(self, hidden: _Optional[int] = ..., ffn: _Optional[int] = ..., dtype: _Optional[str] = ..., padded_numel: _Optional[int] = ..., nbytes: _Optional[int] = ..., slot_nbytes: _Optional[int] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., moe_layers: _Optional[int] = ..., experts: _Optional[int] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExpertEntry(_message.Message):
    __slots__ = ("key", "tier", "nbytes", "crc32")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    key: _common_pb2.ExpertKey
    tier: str
    nbytes: int
    crc32: int
    def __init__(self, key: _Optional[_Union[_common_pb2.ExpertKey, _Mapping]] = ..., tier: _Optional[str] = ..., nbytes: _Optional[int] = ..., crc32: _Optional[int] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("experts",)
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertEntry]
    def __init__(self, experts: _Optional[_Iterable[_Union[ExpertEntry, _Mapping]]] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Segment(_message.Message):
    __slots__ = ("name", "nbytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    nbytes: int
    def __init__(self, name: _Optional[str] = ..., nbytes: _Optional[int] = ...) -> None: ...

class Placement(_message.Message):
    __slots__ = ("key", "segment", "offset")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    key: _common_pb2.ExpertKey
    segment: int
    offset: int
    def __init__(self, key: _Optional[_Union[_common_pb2.ExpertKey, _Mapping]] = ..., segment: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class AttachResponse(_message.Message):
    __slots__ = ("segments", "placements", "host_id")
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENTS_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    placements: _containers.RepeatedCompositeFieldContainer[Placement]
    host_id: str
    def __init__(self, segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., placements: _Optional[_Iterable[_Union[Placement, _Mapping]]] = ..., host_id: _Optional[str] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("key", "chunk_bytes", "offset", "length")
    KEY_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    key: _common_pb2.ExpertKey
    chunk_bytes: int
    offset: int
    length: int
    def __init__(self, key: _Optional[_Union[_common_pb2.ExpertKey, _Mapping]] = ..., chunk_bytes: _Optional[int] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class ExpertChunk(_message.Message):
    __slots__ = ("offset", "data", "crc32", "total")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    crc32: int
    total: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StoreStats(_message.Message):
    __slots__ = ("experts_host", "experts_nvme", "bytes_host", "fetches", "bytes_sent")
    EXPERTS_HOST_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_NVME_FIELD_NUMBER: _ClassVar[int]
    BYTES_HOST_FIELD_NUMBER: _ClassVar[int]
    FETCHES_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    experts_host: int
    experts_nvme: int
    bytes_host: int
    fetches: int
    bytes_sent: int
    def __init__(self, experts_host: _Optional[int] = ..., experts_nvme: _Optional[int] = ..., bytes_host: _Optional[int] = ..., fetches: _Optional[int] = ..., bytes_sent: _Optional[int] = ...) -> None: ...
