"""One relayed sequence: the state the router keeps for it and the loop that pumps a
worker's stream to the client, switching workers on migration and failover.

A worker call is read with `call.read()` until the sequence ends. Three things can end
a call without ending the sequence:

- FINISH_REASON_MIGRATED from the source: every token before the snapshot has been
  relayed; the relay adopts the target's ImportSequence call (set up by `Migrate`),
  checks that the target resumes exactly after the tokens relayed, and continues.
- UNAVAILABLE (or EOF) after tokens were relayed: the worker died. The relay replays the
  request on another worker with the tokens already sent (`ResumeState`) and the seed
  the first worker reported, so the continuation is the one the dead worker would have
  produced (sampling is keyed by seed and position).
- UNAVAILABLE / RESOURCE_EXHAUSTED before anything was produced: another worker is tried.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field

import grpc

from protos.slotmesh.v1 import common_pb2
from services.metadata.records import SequenceRecord, WorkerRecord
from services.metadata.store import now_ms
from services.rpc import plumbing as rpc
from services.rpc.convert import GenerationRequest, request_to_pb
from worker.vocab.streams import Resume

log = logging.getLogger(__name__)

MIGRATED = common_pb2.FINISH_REASON_MIGRATED


class WorkerUnreachableError(Exception):
    """The worker failed before producing anything: try another (excluding it)."""


class WorkerFullError(Exception):
    """The worker's queue is full before anything was produced: try another; when all
    are full the client gets this status."""

    def __init__(self, error: rpc.UpstreamError) -> None:
        self.error = error


class WorkerLostError(Exception):
    """The worker went away mid-stream: fail over."""


@dataclass(slots=True)
class Migration:
    """A migration in flight: the target's call, ready once its acknowledgement is in."""

    target: WorkerRecord
    call: grpc.aio.UnaryStreamCall
    ready: asyncio.Future  # -> the acknowledgement message, or the failure
    adopted: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop()
                                    .create_future())


@dataclass(slots=True)
class RelayedStream:
    """One sequence as this router relays it."""

    request: GenerationRequest  # as validated (request id filled, a taken-over seed set)
    prompt_hash: str
    worker: WorkerRecord | None = None
    call: grpc.aio.UnaryStreamCall | None = None
    status: str = "waiting"
    seed: int | None = None  # the seed the worker samples with (from its first chunk)
    output_token_ids: list[int] = field(default_factory=list)
    emitted_chars: int = 0
    migration: Migration | None = None
    pending: common_pb2.GenerateResponse | None = None  # read by `start`, not yet relayed
    announce_worker: bool = False  # tag the next chunk with the worker (after a migration)
    last_write: float = 0.0

    def __post_init__(self) -> None:
        if self.request.resume is not None:  # the client resumes: its tokens count as sent
            self.output_token_ids = list(self.request.resume.output_token_ids)
            self.emitted_chars = self.request.resume.emitted_chars

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_tokens_emitted(self) -> int:
        return len(self.output_token_ids)

    def record(self, router_id: str) -> SequenceRecord:
        return SequenceRecord(
            request_id=self.request_id, worker_id=self.worker.worker_id if self.worker else "",
            router_id=router_id, status=self.status, prompt_hash=self.prompt_hash,
            num_tokens_emitted=self.num_tokens_emitted, params=self.request.params.to_dict(),
            updated_ms=now_ms(), seed=self.seed or 0)

    def worker_request(self) -> common_pb2.GenerateRequest:
        """What a worker is sent: the request with the seed in use and every token sent so
        far (the client's resume included), so a failover replays from where the lost
        worker was, and a first call is the request as the client made it."""
        params = self.request.params
        if self.seed is not None:
            params = dataclasses.replace(params, seed=self.seed)
        resume = (Resume(output_token_ids=tuple(self.output_token_ids),
                         emitted_chars=self.emitted_chars) if self.output_token_ids else None)
        return request_to_pb(dataclasses.replace(self.request, params=params, resume=resume))

    def on_chunk(self, msg: common_pb2.GenerateResponse) -> None:
        if self.seed is None and msg.seed:
            self.seed = msg.seed
        self.output_token_ids.extend(msg.token_ids)
        self.emitted_chars += len(msg.text)


async def start(stream: RelayedStream) -> None:
    """Wait for the new call's first message (kept in stream.pending): a worker that
    fails before it is tells the caller to try another."""
    try:
        msg = await stream.call.read()
    except grpc.aio.AioRpcError as e:
        raise _classify(e, received=False) from e
    if msg is grpc.aio.EOF:
        raise WorkerUnreachableError("the worker ended the stream before producing anything")
    stream.pending = msg


async def pump(stream: RelayedStream):
    """Relay stream.call until the sequence finishes, yielding each client-visible chunk
    and following migrations (stream.call becomes the target's). Raises
    WorkerUnreachableError / WorkerFullError / WorkerLostError / UpstreamError."""
    received = False
    while True:
        if stream.pending is not None:
            msg, stream.pending, received = stream.pending, None, True
        else:
            try:
                msg = await stream.call.read()
            except grpc.aio.AioRpcError as e:
                raise _classify(e, received) from e
        if msg is grpc.aio.EOF:
            raise WorkerLostError("the worker ended the stream without finishing it")
        received = True
        if msg.finish_reason == MIGRATED:
            await adopt_target(stream)
            received = False  # a new call; its acknowledgement was consumed
            continue
        stream.on_chunk(msg)
        if stream.announce_worker:
            msg.worker_id, stream.announce_worker = stream.worker.worker_id, False
        yield msg
        if msg.finish_reason:
            return


def _classify(e: grpc.aio.AioRpcError, received: bool) -> Exception:
    code = e.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return WorkerLostError(e.details()) if received else WorkerUnreachableError(e.details())
    error = rpc.UpstreamError.from_rpc(e)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not received:
        return WorkerFullError(error)
    return error


async def adopt_target(stream: RelayedStream) -> None:
    """The source sent MIGRATED: switch to the target's call once its ack is in."""
    migration = stream.migration
    if migration is None:
        raise WorkerLostError("the worker handed the sequence off without a migration")
    try:
        ack = await migration.ready
    except Exception as e:  # the target failed after the source let go: fail over
        raise WorkerLostError(f"migration target failed: {e}") from e
    finally:
        stream.migration = None
    if ack.num_resumed_tokens != stream.num_tokens_emitted:
        error = WorkerLostError(f"target resumed after {ack.num_resumed_tokens} tokens, "
                                f"{stream.num_tokens_emitted} were relayed")
        migration.call.cancel()
        migration.adopted.set_exception(error)
        raise error
    stream.call.cancel()
    stream.call, stream.worker = migration.call, migration.target
    stream.status, stream.announce_worker = "running", True
    migration.adopted.set_result(time.perf_counter())
