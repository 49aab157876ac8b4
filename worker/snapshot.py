"""Sequence snapshots: slotmesh's version of llama.cpp's `llama_state_seq_get_data_ext`.

A snapshot is everything needed to continue one sequence on another worker with the same
model: its tokens and progress, sampling parameters and stop state, and (unless
TOKENS_ONLY) the KV of its computed tokens, block by block, per KV group. The format is
our own — never pickle — and is checked completely before anything is allocated:

    offset  size  field
    0       8     magic b"SMSNAP\\r\\n"   (catches text-mode mangling, like PNG's)
    8       2     format version, little endian (1)
    10      2     kind: 1 FULL, 2 SWA_ONLY (sliding-window groups only), 3 TOKENS_ONLY
    12      4     header length H
    16      H     header: UTF-8 JSON (model fingerprint, dtype, block size, token counts,
                  seed, sampling params, stop state, per-group layout and block range),
                  padded with spaces so the KV starts 64-byte aligned
    16+H    …     per group with KV: [2, layers, blocks, block_size, kv_heads, head_dim]
                  raw tensor bytes in `dtype` (the decoder's tensors alias them)
    …       4·N   token ids, int32 little endian
    end-32  32    SHA-256 of every byte before it (version 1), or HMAC-SHA-256 under
                  the cluster key (version 2; worker/vocab/integrity.py). SHA-NI makes it ~2.5×
                  faster than BLAKE2b here.

Sent in bounded chunks (`iter_chunks`), reassembled with a size bound (`Assembler`).
Structural problems raise InvalidRequestError, a checksum mismatch DataLossError; model
compatibility is the engine's check (PreconditionError).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from worker.vocab import integrity
from worker.vocab.errors import InvalidRequestError
from worker.vocab.snapshot_kind import SnapshotKind

MAGIC = b"SMSNAP\r\n"
_PREFIX = struct.Struct("<8sHHI")
_DIGEST_BYTES = integrity.DIGEST_BYTES
CHUNK_BYTES = 4 << 20
__all__ = ["Assembler", "GroupKV", "Snapshot", "SnapshotKind", "decode", "encode",
           "iter_chunks"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupKV:
    """One KV group's part: block-table entries [first_block, first_block + num_blocks)."""

    window: int | None
    num_layers: int
    first_block: int
    num_blocks: int
    data: torch.Tensor | None  # CPU [2, layers, blocks, block_size, kv_heads, head_dim]


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    kind: SnapshotKind
    fingerprint: str
    dtype: str
    block_size: int
    num_kv_heads: int
    head_dim: int
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    num_computed_tokens: int  # tokens whose KV the groups carry (0 for TOKENS_ONLY)
    seed: int
    params: dict  # SamplingParams fields, JSON-friendly
    emitted_chars: int  # generated text already handed out (stop strings hold back)
    groups: list[GroupKV]

    @property
    def has_kv(self) -> bool:
        return any(g.data is not None for g in self.groups)


# -- encoding ----------------------------------------------------------------------------

def _header(snap: Snapshot) -> bytes:
    return json.dumps({
        "fingerprint": snap.fingerprint, "dtype": snap.dtype, "block_size": snap.block_size,
        "num_kv_heads": snap.num_kv_heads, "head_dim": snap.head_dim,
        "request_id": snap.request_id, "num_tokens": len(snap.token_ids),
        "num_prompt_tokens": snap.num_prompt_tokens,
        "num_computed_tokens": snap.num_computed_tokens, "seed": snap.seed,
        "params": snap.params, "emitted_chars": snap.emitted_chars,
        "groups": [{"window": g.window, "num_layers": g.num_layers,
                    "first_block": g.first_block, "num_blocks": g.num_blocks,
                    "has_kv": g.data is not None} for g in snap.groups],
    }, separators=(",", ":"), sort_keys=True).encode()


def _parts(snap: Snapshot, version: int) -> Iterator[bytes | memoryview]:
    header = _header(snap)
    header += b" " * (-(_PREFIX.size + len(header)) % 64)
    yield _PREFIX.pack(MAGIC, version, int(snap.kind), len(header))
    yield header
    for g in snap.groups:
        if g.data is not None:
            yield memoryview(g.data.contiguous().view(torch.uint8).numpy()).cast("B")
    yield torch.tensor(snap.token_ids, dtype=torch.int32).numpy().tobytes()


def iter_chunks(snap: Snapshot, chunk_bytes: int = CHUNK_BYTES,
                key: bytes | None = None) -> Iterator[bytes]:
    """The encoded snapshot in chunks of at most chunk_bytes; the checksum (or MAC, with
    a cluster key) comes last. Each byte of KV is copied once, from the tensor into its
    chunk."""
    digest = integrity.new_digest(key)
    for part in _parts(snap, integrity.version_for(key)):
        digest.update(part)
        view = memoryview(part)
        for i in range(0, len(view), chunk_bytes):
            yield bytes(view[i:i + chunk_bytes])
    yield digest.digest()


def encode(snap: Snapshot, key: bytes | None = None) -> bytes:
    return b"".join(iter_chunks(snap, key=key))


# -- decoding ----------------------------------------------------------------------------

class Assembler:
    """Collects streamed chunks up to max_bytes (checked as they arrive)."""

    def __init__(self, max_bytes: int, key: bytes | None = None) -> None:
        self.max_bytes = max_bytes
        self.key = key
        self.buffer = bytearray()

    def add(self, chunk: bytes) -> None:
        if len(self.buffer) + len(chunk) > self.max_bytes:
            raise InvalidRequestError("snapshot", f"larger than the limit of "
                                                  f"{self.max_bytes} bytes")
        self.buffer += chunk

    def snapshot(self) -> Snapshot:
        return decode(self.buffer, self.key)


def _bad(message: str) -> InvalidRequestError:
    return InvalidRequestError("snapshot", message)


def decode(data: bytes | bytearray, key: bytes | None = None) -> Snapshot:
    """Parse and verify (under the cluster key, if this process has one); raises before
    building any tensor when anything is off."""
    if len(data) < _PREFIX.size + _DIGEST_BYTES:
        raise _bad(f"truncated: {len(data)} bytes")
    magic, version, kind, header_len = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise _bad("not a slotmesh snapshot (bad magic)")
    if version not in (integrity.PLAIN, integrity.KEYED):
        raise _bad(f"format version {version} is not supported (this build reads "
                   f"{integrity.PLAIN} and {integrity.KEYED})")
    body, digest = memoryview(data)[:-_DIGEST_BYTES], bytes(data[-_DIGEST_BYTES:])
    integrity.verify(body, digest, version, key, "snapshot")
    if kind not in SnapshotKind._value2member_map_:
        raise _bad(f"unknown kind {kind}")
    end_header = _PREFIX.size + header_len
    if end_header > len(body):
        raise _bad("header runs past the end")
    try:
        header = json.loads(bytes(body[_PREFIX.size:end_header]))
    except ValueError as e:
        raise _bad(f"header is not JSON: {e}") from e
    h = _check_header(header)
    return _build(SnapshotKind(kind), h, body[end_header:])


_HEADER_TYPES = {
    "fingerprint": str, "dtype": str, "block_size": int, "num_kv_heads": int,
    "head_dim": int, "request_id": str, "num_tokens": int, "num_prompt_tokens": int,
    "num_computed_tokens": int, "seed": int, "params": dict, "emitted_chars": int,
    "groups": list,
}
_GROUP_TYPES = {"num_layers": int, "first_block": int, "num_blocks": int, "has_kv": bool}


def _check_header(h) -> dict:
    if not isinstance(h, dict):
        raise _bad("header is not an object")
    for key, typ in _HEADER_TYPES.items():
        if not isinstance(h.get(key), typ) or (typ is int and isinstance(h[key], bool)):
            raise _bad(f"header field {key!r} missing or not {typ.__name__}")
    for key in ("block_size", "num_kv_heads", "head_dim"):
        if not 1 <= h[key] <= 1 << 16:
            raise _bad(f"{key} {h[key]} out of range")
    if h["dtype"] not in _DTYPES:
        raise _bad(f"unknown dtype {h['dtype']!r}")
    counts = (h["num_tokens"], h["num_prompt_tokens"], h["num_computed_tokens"])
    if not (0 < h["num_prompt_tokens"] <= h["num_tokens"] <= 1 << 24
            and 0 <= h["num_computed_tokens"] <= h["num_tokens"]):
        raise _bad(f"inconsistent token counts {counts}")
    if h["emitted_chars"] < 0 or not 0 <= h["seed"] < 2**63:
        raise _bad("emitted_chars or seed out of range")
    for g in h["groups"]:
        if not isinstance(g, dict):
            raise _bad("group entry is not an object")
        for key, typ in _GROUP_TYPES.items():
            if not isinstance(g.get(key), typ) or (typ is int and isinstance(g[key], bool)):
                raise _bad(f"group field {key!r} missing or not {typ.__name__}")
        window = g.get("window")
        if window is not None and (not isinstance(window, int) or window < 1):
            raise _bad("group window must be null or a positive integer")
        if not (1 <= g["num_layers"] <= 4096 and 0 <= g["first_block"] <= 1 << 24
                and 0 <= g["num_blocks"] <= 1 << 24):
            raise _bad("group layout out of range")
    return h


def _build(kind: SnapshotKind, h: dict, payload: memoryview) -> Snapshot:
    num_tokens = h["num_tokens"]
    elem = torch.empty((), dtype=_DTYPES[h["dtype"]]).element_size()
    sizes = [2 * g["num_layers"] * g["num_blocks"] * h["block_size"] * h["num_kv_heads"]
             * h["head_dim"] * elem if g["has_kv"] else 0 for g in h["groups"]]
    if len(payload) != 4 * num_tokens + sum(sizes):
        raise _bad(f"payload is {len(payload)} bytes; the header describes "
                   f"{4 * num_tokens + sum(sizes)}")
    if payload.readonly:  # the KV tensors alias the buffer, which must be writable
        payload = memoryview(bytearray(payload))
    offset = 0
    groups = []
    for g, size in zip(h["groups"], sizes, strict=True):
        data = None
        if g["has_kv"]:
            raw = (torch.frombuffer(payload[offset:offset + size], dtype=torch.uint8)
                   if size else torch.empty(0, dtype=torch.uint8))
            if raw.data_ptr() % 64:
                raw = raw.clone()  # not aligned for the element type: one copy
            data = raw.view(_DTYPES[h["dtype"]]).reshape(
                2, g["num_layers"], g["num_blocks"], h["block_size"], h["num_kv_heads"],
                h["head_dim"])
            offset += size
        groups.append(GroupKV(window=g.get("window"), num_layers=g["num_layers"],
                              first_block=g["first_block"], num_blocks=g["num_blocks"],
                              data=data))
    token_ids = torch.frombuffer(bytearray(payload[offset:]), dtype=torch.int32)
    return Snapshot(
        kind=kind, fingerprint=h["fingerprint"], dtype=h["dtype"],
        block_size=h["block_size"], num_kv_heads=h["num_kv_heads"], head_dim=h["head_dim"],
        request_id=h["request_id"], token_ids=token_ids.tolist(),
        num_prompt_tokens=h["num_prompt_tokens"],
        num_computed_tokens=h["num_computed_tokens"], seed=h["seed"], params=h["params"],
        emitted_chars=h["emitted_chars"], groups=groups)
