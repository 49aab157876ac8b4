"""`slotmesh seq save|restore`: a running sequence to a file and back, on any worker with
the same model (llama.cpp's slot save/restore, as snapshots in slotmesh's own format).

    slotmesh seq save --worker HOST:PORT REQUEST_ID FILE [--kind full|swa_only|tokens_only]
                      [--no-checkpoints]
    slotmesh seq restore --worker HOST:PORT FILE [--json]

On a secured worker (docs/security.md) both take the cluster key (--cluster-key-file) or
a client certificate (--tls-cert/--tls-key), and --tls-ca for a TLS worker.

Save takes a snapshot at the next step boundary and lets the sequence run on; the file is
written to FILE.tmp and renamed, so a failed save leaves nothing behind. The file also
keeps the sequence's prompt-cache checkpoints (unlike llama.cpp's slot files, which lose
them): restoring writes them back to the cluster's prompt cache, so the sequence can be
rolled back to any of them (a chat edited a turn back) without recomputing. Restore
uploads the file and streams the continuation (text, or one JSON object with --json).

File layout: b"SMSEQ\\r\\n\\0", a uint32 count of parts, then per part a uint64 length and
the part: the sequence's snapshot first, then its checkpoints, oldest first (each part is
a snapshot in worker/snapshot.py's format and carries its own checksum). A bare snapshot
(the format before checkpoints) is restored as well.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from pathlib import Path

from services.cli.flags import exit_code_of
from worker.vocab.errors import SlotmeshError

_KINDS = ("full", "swa_only", "tokens_only")
FILE_MAGIC = b"SMSEQ\r\n\0"
_COUNT = struct.Struct("<I")
_LENGTH = struct.Struct("<Q")


def pack_parts(parts: list[bytes]) -> bytes:
    return b"".join([FILE_MAGIC, _COUNT.pack(len(parts)),
                     *(_LENGTH.pack(len(p)) + p for p in parts)])


def unpack_parts(data: bytes) -> list[bytes]:
    """The parts of a sequence file (one for a bare snapshot); SlotmeshError if cut short."""
    if not data.startswith(FILE_MAGIC):
        return [data]
    offset = len(FILE_MAGIC)
    if len(data) < offset + _COUNT.size:
        raise SlotmeshError("file: not a complete sequence file (cut before its part count)")
    (count,), offset = _COUNT.unpack_from(data, offset), offset + _COUNT.size
    if count * _LENGTH.size > len(data) - offset:  # each part takes at least its length
        raise SlotmeshError(f"file: not a complete sequence file (it claims {count} parts "
                            f"in {len(data)} bytes)")
    parts = []
    for number in range(count):
        if len(data) < offset + _LENGTH.size:
            raise SlotmeshError(f"file: not a complete sequence file (cut before part "
                                f"{number + 1} of {count})")
        (size,), offset = _LENGTH.unpack_from(data, offset), offset + _LENGTH.size
        if offset + size > len(data):
            raise SlotmeshError(f"file: not a complete sequence file (part {number + 1} of "
                                f"{count} runs past the end)")
        parts.append(data[offset:offset + size])
        offset += size
    if not parts or offset != len(data):
        raise SlotmeshError("file: not a complete sequence file (parts and size disagree)")
    return parts


def add_seq_parser(sub) -> None:
    p = sub.add_parser("seq", help="save a running sequence to a file / restore it",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    seq_sub = p.add_subparsers(dest="seq", required=True)
    s = seq_sub.add_parser("save", help="snapshot a running sequence into FILE")
    s.add_argument("--worker", required=True, metavar="HOST:PORT",
                   help="the worker that runs it (see `slotmesh up` or GetSequence)")
    s.add_argument("request_id")
    s.add_argument("file", type=Path)
    s.add_argument("--kind", choices=_KINDS, default="full",
                   help="full: every layer's KV (default); swa_only: sliding-window layers "
                        "only; tokens_only: no KV (the restorer recomputes it)")
    s.add_argument("--no-checkpoints", action="store_true",
                   help="leave the sequence's prompt-cache checkpoints out of the file")
    _security_flags(s)
    s.set_defaults(func=cmd_save)
    r = seq_sub.add_parser("restore", help="continue the sequence in FILE on a worker")
    r.add_argument("--worker", required=True, metavar="HOST:PORT")
    r.add_argument("file", type=Path)
    r.add_argument("--json", action="store_true",
                   help="print one JSON object with text, token_ids, finish_reason")
    _security_flags(r)
    r.set_defaults(func=cmd_restore)


def _security_flags(p: argparse.ArgumentParser) -> None:
    """A secured worker asks for the cluster credential or a client certificate."""
    from services.security.tls import add_tls_flags

    add_tls_flags(p, server=False)
    p.add_argument("--cluster-key-file", type=Path,
                   default=os.environ.get("SLOTMESH_CLUSTER_KEY_FILE") or None,
                   help="the workers' cluster key: the call carries the credential derived "
                        "from it (default: $SLOTMESH_CLUSTER_KEY_FILE)")


def _worker_channel(args: argparse.Namespace):
    """A blocking channel to --worker with the command's TLS and cluster credential."""
    from services.cli.flags import client_tls
    from services.rpc.plumbing import blocking_channel
    from services.security.cluster_auth import caller_metadata
    from worker.vocab.integrity import load_key

    key = load_key(args.cluster_key_file) if args.cluster_key_file else None
    return blocking_channel(args.worker, tls=client_tls(args), metadata=caller_metadata(key))


def _kind(name: str) -> int:
    from protos.slotmesh.v1 import common_pb2

    return common_pb2.SnapshotKind.Value(f"SNAPSHOT_KIND_{name.upper()}")


def cmd_save(args: argparse.Namespace) -> int:
    import grpc

    from protos.slotmesh.v1 import worker_pb2, worker_pb2_grpc

    tmp = args.file.with_name(args.file.name + ".tmp")
    parts: list[bytearray] = []
    channel = _worker_channel(args)
    try:
        with channel as ch:
            stub = worker_pb2_grpc.WorkerStub(ch)
            for chunk in stub.ExportSequence(worker_pb2.ExportSequenceRequest(
                    request_id=args.request_id, kind=_kind(args.kind), pause=False,
                    with_checkpoints=not args.no_checkpoints)):
                if chunk.part == len(parts):
                    parts.append(bytearray())
                parts[-1] += chunk.data
        with open(tmp, "wb") as f:
            f.write(pack_parts(parts))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, args.file)
    except grpc.RpcError as e:
        tmp.unlink(missing_ok=True)
        print(f"slotmesh: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return exit_code_of(e.code().name)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SlotmeshError(f"file: cannot write {args.file}: {e}") from e
    print(f"saved {args.request_id} to {args.file} ({sum(map(len, parts))} bytes, "
          f"{len(parts) - 1} checkpoints)")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    import grpc

    from protos.slotmesh.v1 import common_pb2, worker_pb2_grpc
    from services.client.clients import Completion
    from services.rpc.convert import chunk_from_pb
    from worker.snapshot import CHUNK_BYTES

    try:
        parts = unpack_parts(args.file.read_bytes())
    except OSError as e:
        raise SlotmeshError(f"file: cannot read {args.file}: {e}") from e
    chunks = (common_pb2.SnapshotChunk(data=data[i:i + CHUNK_BYTES], part=part)
              for part, data in enumerate(parts) for i in range(0, len(data), CHUNK_BYTES))
    result = Completion()
    channel = _worker_channel(args)
    try:
        with channel as ch:
            for msg in worker_pb2_grpc.WorkerStub(ch).RestoreSequence(chunks):
                chunk = chunk_from_pb(msg)
                result.add(chunk)
                if not args.json:
                    print(chunk.text, end="", flush=True)
    except grpc.RpcError as e:
        print(f"\nslotmesh: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return exit_code_of(e.code().name)
    if args.json:
        print(json.dumps({"request_id": result.request_id, "text": result.text,
                          "token_ids": result.token_ids, "finish_reason": result.finish_reason,
                          "worker_id": result.worker_id}))
    else:
        print()
    return 0
