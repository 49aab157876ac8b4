from protos.slotmesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SequenceStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEQUENCE_STATUS_UNSPECIFIED: _ClassVar[SequenceStatus]
    SEQUENCE_STATUS_WAITING: _ClassVar[SequenceStatus]
    SEQUENCE_STATUS_RUNNING: _ClassVar[SequenceStatus]
    SEQUENCE_STATUS_MIGRATING: _ClassVar[SequenceStatus]
SEQUENCE_STATUS_UNSPECIFIED: SequenceStatus
SEQUENCE_STATUS_WAITING: SequenceStatus
SEQUENCE_STATUS_RUNNING: SequenceStatus
SEQUENCE_STATUS_MIGRATING: SequenceStatus

class MigrateRequest(_message.Message):
    __slots__ = ("request_id", "target_worker_id", "kind", "forwarded")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    FORWARDED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    target_worker_id: str
    kind: _common_pb2.SnapshotKind
    forwarded: bool
    def __init__(self, request_id: _Optional[str] = ..., target_worker_id: _Optional[str] = ..., kind: _Optional[_Union[_common_pb2.SnapshotKind, str]] = ..., forwarded: _Optional[bool] = ...) -> None: ...

class MigrateResponse(_message.Message):
    __slots__ = ("source_worker_id", "target_worker_id", "num_tokens_at_migration", "duration_s", "snapshot_bytes")
    SOURCE_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_AT_MIGRATION_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_BYTES_FIELD_NUMBER: _ClassVar[int]
    source_worker_id: str
    target_worker_id: str
    num_tokens_at_migration: int
    duration_s: float
    snapshot_bytes: int
    def __init__(self, source_worker_id: _Optional[str] = ..., target_worker_id: _Optional[str] = ..., num_tokens_at_migration: _Optional[int] = ..., duration_s: _Optional[float] = ..., snapshot_bytes: _Optional[int] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("worker_id", "forwarded")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    FORWARDED_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    forwarded: bool
    def __init__(self, worker_id: _Optional[str] = ..., forwarded: _Optional[bool] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("num_migrated", "num_failed")
    NUM_MIGRATED_FIELD_NUMBER: _ClassVar[int]
    NUM_FAILED_FIELD_NUMBER: _ClassVar[int]
    num_migrated: int
    num_failed: int
    def __init__(self, num_migrated: _Optional[int] = ..., num_failed: _Optional[int] = ...) -> None: ...

class UndrainRequest(_message.Message):
    __slots__ = ("worker_id", "forwarded")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    FORWARDED_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    forwarded: bool
    def __init__(self, worker_id: _Optional[str] = ..., forwarded: _Optional[bool] = ...) -> None: ...

class UndrainResponse(_message.Message):
    __slots__ = ("was_draining",)
    WAS_DRAINING_FIELD_NUMBER: _ClassVar[int]
    was_draining: bool
    def __init__(self, was_draining: _Optional[bool] = ...) -> None: ...

class GetSequenceRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class SequenceInfo(_message.Message):
    __slots__ = ("request_id", "worker_id", "status", "num_tokens_emitted", "prompt_hash", "params", "router_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_EMITTED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_HASH_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ROUTER_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    worker_id: str
    status: SequenceStatus
    num_tokens_emitted: int
    prompt_hash: str
    params: _common_pb2.SamplingParams
    router_id: str
    def __init__(self, request_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., status: _Optional[_Union[SequenceStatus, str]] = ..., num_tokens_emitted: _Optional[int] = ..., prompt_hash: _Optional[str] = ..., params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., router_id: _Optional[str] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[_common_pb2.WorkerInfo]
    def __init__(self, workers: _Optional[_Iterable[_Union[_common_pb2.WorkerInfo, _Mapping]]] = ...) -> None: ...
