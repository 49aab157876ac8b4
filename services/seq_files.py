"""`slotmesh seq save|restore`: a running sequence to a file and back, on any worker with
the same model (llama.cpp's slot save/restore, as snapshots in slotmesh's own format).

    slotmesh seq save --worker HOST:PORT REQUEST_ID FILE [--kind full|swa_only|tokens_only]
    slotmesh seq restore --worker HOST:PORT FILE [--json]

Save takes a snapshot at the next step boundary and lets the sequence run on; the file is
written to FILE.tmp and renamed, so a failed save leaves nothing behind. Restore uploads
the file and streams the continuation (text, or one JSON object with --json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from worker.errors import SlotmeshError

_KINDS = ("full", "swa_only", "tokens_only")


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
    s.set_defaults(func=cmd_save)
    r = seq_sub.add_parser("restore", help="continue the sequence in FILE on a worker")
    r.add_argument("--worker", required=True, metavar="HOST:PORT")
    r.add_argument("file", type=Path)
    r.add_argument("--json", action="store_true",
                   help="print one JSON object with text, token_ids, finish_reason")
    r.set_defaults(func=cmd_restore)


def _kind(name: str) -> int:
    from protos.slotmesh.v1 import common_pb2

    return common_pb2.SnapshotKind.Value(f"SNAPSHOT_KIND_{name.upper()}")


def cmd_save(args: argparse.Namespace) -> int:
    import grpc

    from protos.slotmesh.v1 import worker_pb2, worker_pb2_grpc
    from services.rpc import CHANNEL_OPTIONS

    tmp = args.file.with_name(args.file.name + ".tmp")
    size = 0
    try:
        with grpc.insecure_channel(args.worker, options=CHANNEL_OPTIONS) as ch, \
                open(tmp, "wb") as f:
            stub = worker_pb2_grpc.WorkerStub(ch)
            for chunk in stub.ExportSequence(worker_pb2.ExportSequenceRequest(
                    request_id=args.request_id, kind=_kind(args.kind), pause=False)):
                f.write(chunk.data)
                size += len(chunk.data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, args.file)
    except grpc.RpcError as e:
        tmp.unlink(missing_ok=True)
        print(f"slotmesh: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SlotmeshError(f"file: cannot write {args.file}: {e}") from e
    print(f"saved {args.request_id} to {args.file} ({size} bytes)")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    import grpc

    from protos.slotmesh.v1 import common_pb2, worker_pb2_grpc
    from services.client import Completion
    from services.convert import chunk_from_pb
    from services.rpc import CHANNEL_OPTIONS
    from worker.snapshot import CHUNK_BYTES

    try:
        data = args.file.read_bytes()
    except OSError as e:
        raise SlotmeshError(f"file: cannot read {args.file}: {e}") from e
    chunks = (common_pb2.SnapshotChunk(data=data[i:i + CHUNK_BYTES])
              for i in range(0, len(data), CHUNK_BYTES))
    result = Completion()
    try:
        with grpc.insecure_channel(args.worker, options=CHANNEL_OPTIONS) as ch:
            for msg in worker_pb2_grpc.WorkerStub(ch).RestoreSequence(chunks):
                chunk = chunk_from_pb(msg)
                result.add(chunk)
                if not args.json:
                    print(chunk.text, end="", flush=True)
    except grpc.RpcError as e:
        print(f"\nslotmesh: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2 if e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS,
                                 grpc.StatusCode.FAILED_PRECONDITION) else 1
    if args.json:
        print(json.dumps({"request_id": result.request_id, "text": result.text,
                          "token_ids": result.token_ids, "finish_reason": result.finish_reason,
                          "worker_id": result.worker_id}))
    else:
        print()
    return 0
