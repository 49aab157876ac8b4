"""Snapshots and prompt-cache block records under a cluster key: a MAC that anyone
without the key cannot forge, checked before any tensor is built; and no code path that
could deserialize code-bearing formats (pickle, torch.load) from the network or Redis."""

from __future__ import annotations

import ast
import hashlib
import struct
from pathlib import Path

import pytest
import torch

from tests.paths import REPO
from worker.checkpoints import decode_block, encode_block
from worker.snapshot import GroupKV, Snapshot, SnapshotKind, decode, encode
from worker.vocab.errors import (
    DataLossError,
    InvalidRequestError,
    PermissionDeniedError,
    PreconditionError,
)
from worker.vocab.integrity import load_key

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def snapshot() -> Snapshot:
    kv = torch.arange(2 * 2 * 3 * 4 * 1 * 8, dtype=torch.float32).reshape(2, 2, 3, 4, 1, 8)
    return Snapshot(kind=SnapshotKind.FULL, fingerprint="f" * 64, dtype="float32",
                    block_size=4, num_kv_heads=1, head_dim=8, request_id="r",
                    token_ids=list(range(11)), num_prompt_tokens=9, num_computed_tokens=10,
                    seed=3, params={}, emitted_chars=0,
                    groups=[GroupKV(window=None, num_layers=2, first_block=0, num_blocks=3,
                                    data=kv)])


def test_keyed_snapshot_round_trips_and_needs_the_key() -> None:
    blob = encode(snapshot(), KEY)
    assert decode(blob, KEY).token_ids == list(range(11))
    with pytest.raises(DataLossError, match="MAC does not verify"):
        decode(blob, OTHER_KEY)
    with pytest.raises(PreconditionError, match="has none"):
        decode(blob)  # a worker without the key cannot check it
    with pytest.raises(PermissionDeniedError, match="not authenticated"):
        decode(encode(snapshot()), KEY)  # a plain checksum is not enough on a keyed cluster


def _resign_plain(blob: bytes, edit) -> bytes:
    """What a forger without the key can do: change bytes and recompute a checksum."""
    body = bytearray(blob[:-32])
    edit(body)
    return bytes(body) + hashlib.sha256(body).digest()


def test_forged_snapshots_are_refused_before_any_tensor(monkeypatch) -> None:
    blob = encode(snapshot(), KEY)
    built = []
    monkeypatch.setattr(torch, "frombuffer", lambda *a, **k: built.append(a) or 1 / 0)

    def raise_seed(body: bytearray) -> None:
        body[body.index(b'"seed":3')+7:body.index(b'"seed":3')+8] = b"4"

    forged_plain = _resign_plain(blob, lambda b: (raise_seed(b), struct.pack_into("<H", b, 8, 1)))
    with pytest.raises(PermissionDeniedError):
        decode(forged_plain, KEY)
    forged_keyed = _resign_plain(blob, raise_seed)  # version 2, digest not a MAC under KEY
    with pytest.raises(DataLossError):
        decode(forged_keyed, KEY)
    assert built == []  # refused before any tensor was made from the bytes


def test_keyed_block_records() -> None:
    shapes = [(2, 3, 4, 1, 8)]
    tensors = [torch.randn(shapes[0])]
    h = bytes(16)
    record = encode_block(h, tensors, KEY)
    assert torch.equal(decode_block(record, h, shapes, torch.float32, KEY)[0], tensors[0])
    with pytest.raises(DataLossError):
        decode_block(record, h, shapes, torch.float32, OTHER_KEY)
    with pytest.raises(PermissionDeniedError):
        decode_block(encode_block(h, tensors), h, shapes, torch.float32, KEY)
    with pytest.raises(DataLossError, match="another block"):
        decode_block(encode_block(h, tensors, KEY), b"\1" * 16, shapes, torch.float32, KEY)


def test_key_files(tmp_path) -> None:
    hexfile, rawfile, short = tmp_path / "hex", tmp_path / "raw", tmp_path / "short"
    hexfile.write_text(KEY.hex() + "\n")
    rawfile.write_bytes(b"k" * 40)
    short.write_text("0123")
    assert load_key(hexfile) == KEY
    assert load_key(rawfile) == b"k" * 40
    with pytest.raises(InvalidRequestError, match=r"--cluster-key-file.*32 bytes"):
        load_key(short)


# -- nothing from the network or Redis is unpickled --------------------------------------

_FORBIDDEN = {("pickle", "load"), ("pickle", "loads"), ("torch", "load"),
              ("marshal", "loads"), ("marshal", "load"), ("dill", "loads"),
              ("shelve", "open"), ("numpy", "load"), ("np", "load"), ("yaml", "load"),
              ("joblib", "load"), ("cloudpickle", "loads")}


def _forbidden_calls(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            if any(n.split(".")[0] in {"pickle", "marshal", "dill", "shelve", "cloudpickle",
                                      "joblib"} for n in names):
                found.append(f"{path.name}:{node.lineno}: imports {names}")
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and (node.value.id, node.attr) in _FORBIDDEN:
            found.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_code_path_unpickles_or_torch_loads() -> None:
    """Every module that serves, routes, stores or trains: no pickle-family import and no
    torch.load / numpy.load anywhere (snapshots and records use slotmesh's own formats;
    GGUF and safetensors are parsed as data)."""
    files = [p for d in ("services", "worker", "kernels", "protos")
             for p in (REPO / d).rglob("*.py") if not p.name.endswith("_pb2.py")]
    assert len(files) > 50
    found = [f for p in files for f in _forbidden_calls(p)]
    assert found == []
