"""Typed values stored in Redis. JSON on the wire; every field's type is checked on read,
so a malformed or hostile value is rejected, never trusted (and never unpickled)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, TypeVar

from worker.vocab.errors import SlotmeshError

_TYPES = {"int": int, "str": str, "dict": dict, "float": float, "bool": bool}
T = TypeVar("T")


class CorruptRecordError(SlotmeshError):
    """A value in Redis is not a valid record."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerRecord:
    """A worker's identity and load, renewed with every heartbeat."""

    worker_id: str
    address: str
    model: str
    fingerprint: str
    architecture: str
    dtype: str
    device: str
    max_model_len: int
    slots: int
    block_size: int
    attention_backend: str
    version: str
    num_running: int
    num_waiting: int
    kv_blocks_free: int
    kv_blocks_total: int
    heartbeat_ms: int
    draining: bool
    instance_id: str  # random per process start: a drain excludes this process only
    weights: str  # what the linears multiply in (worker/models/packing.py describe_weights)


@dataclass(frozen=True, slots=True, kw_only=True)
class SequenceRecord:
    """Slot metadata of one running sequence, written by the router that relays it."""

    request_id: str
    worker_id: str
    router_id: str
    status: str  # "waiting" | "running" | "migrating"
    prompt_hash: str
    num_tokens_emitted: int
    params: dict  # SamplingParams fields
    updated_ms: int
    seed: int  # the seed the worker samples with (failover replays with it)


def to_dict(record: Any) -> dict[str, Any]:
    return dataclasses.asdict(record)


def encode(record: Any) -> str:
    return json.dumps(to_dict(record), separators=(",", ":"), sort_keys=True)


def parse_object(cls: type, raw: bytes | str) -> dict[str, Any]:
    """The JSON object of one stored value; CorruptRecordError if it is not one."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptRecordError(f"{cls.__name__}: not JSON ({e})") from e
    if not isinstance(data, dict):
        raise CorruptRecordError(f"{cls.__name__}: not a JSON object")
    return data


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Type-check one record's fields (others are ignored); CorruptRecordError on any
    mismatch."""
    values = {}
    for f in dataclasses.fields(cls):
        value = data.get(f.name)
        want = _TYPES[f.type]
        if not isinstance(value, want) or (want is not bool and isinstance(value, bool)):
            raise CorruptRecordError(f"{cls.__name__}.{f.name}: expected {f.type}, "
                                     f"got {type(value).__name__}")
        values[f.name] = value
    return cls(**values)


def decode(cls: type[T], raw: bytes | str) -> T:
    """Parse and type-check one record; raise CorruptRecordError on any mismatch."""
    return from_dict(cls, parse_object(cls, raw))


@dataclass(frozen=True, slots=True, kw_only=True)
class RouterRecord:
    """A live router: where peers reach it to forward Migrate/Drain for the sequences it
    relays (a SequenceRecord names its router by id)."""

    router_id: str
    address: str
    heartbeat_ms: int
