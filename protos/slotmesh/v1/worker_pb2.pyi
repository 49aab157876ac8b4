from protos.slotmesh.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExportSequenceRequest(_message.Message):
    __slots__ = ("request_id", "kind", "pause", "with_checkpoints")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PAUSE_FIELD_NUMBER: _ClassVar[int]
    WITH_CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    kind: _common_pb2.SnapshotKind
    pause: bool
    with_checkpoints: bool
    def __init__(self, request_id: _Optional[str] = ..., kind: _Optional[_Union[_common_pb2.SnapshotKind, str]] = ..., pause: _Optional[bool] = ..., with_checkpoints: _Optional[bool] = ...) -> None: ...

class CommitExportRequest(_message.Message):
    __slots__ = ("request_id", "commit")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    commit: bool
    def __init__(self, request_id: _Optional[str] = ..., commit: _Optional[bool] = ...) -> None: ...

class CommitExportResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class ImportSequenceRequest(_message.Message):
    __slots__ = ("source_address", "request_id", "kind")
    SOURCE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    source_address: str
    request_id: str
    kind: _common_pb2.SnapshotKind
    def __init__(self, source_address: _Optional[str] = ..., request_id: _Optional[str] = ..., kind: _Optional[_Union[_common_pb2.SnapshotKind, str]] = ...) -> None: ...

class SetDrainingRequest(_message.Message):
    __slots__ = ("draining",)
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    draining: bool
    def __init__(self, draining: _Optional[bool] = ...) -> None: ...

class SetDrainingResponse(_message.Message):
    __slots__ = ("num_sequences",)
    NUM_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    num_sequences: int
    def __init__(self, num_sequences: _Optional[int] = ...) -> None: ...
