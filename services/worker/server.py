"""The worker's gRPC service: the async engine behind grpc.aio, registered in Redis.

Protobuf is converted at this edge (services/rpc/convert.py) and nowhere deeper. The engine
task owns every sequence; this module only submits requests, relays their chunks and
reports load with a heartbeat that renews the worker's registry key.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version

import grpc

from protos.slotmesh.v1 import (
    common_pb2,
    router_pb2,
    router_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from services.local.process import announce_ready, shutdown_requested
from services.metadata.records import WorkerRecord
from services.metadata.store import RedisStore, StoreUnavailableError, now_ms
from services.rpc import plumbing as rpc
from services.rpc.convert import chunk_to_pb, kind_from_pb, record_to_info, request_from_pb
from services.rpc.metrics import StreamTimer, WorkerMetrics, serve_metrics
from services.rpc.periodic import Periodic
from services.security.cluster_auth import CallerAuthInterceptor, caller_metadata
from services.worker.config import ServerConfig
from services.worker.prompt_cache import PromptCache
from worker.async_engine import AsyncEngine
from worker.checkpoints import PrefixRestore
from worker.config import EngineConfig
from worker.engine import LLMEngine
from worker.kv_transfer import is_complete
from worker.progress import Progress, silent
from worker.snapshot import CHUNK_BYTES, Assembler, Snapshot, decode, iter_chunks
from worker.vocab.errors import InvalidRequestError, PreconditionError, UnavailableError

log = logging.getLogger(__name__)

SERVICE_NAME = "slotmesh.v1.Worker"


def slotmesh_version() -> str:
    try:
        return version("slotmesh")
    except PackageNotFoundError:
        return "unknown"


class WorkerService(worker_pb2_grpc.WorkerServicer):
    def __init__(self, engine: AsyncEngine, worker_id: str, address: str,
                 metrics: WorkerMetrics, config: ServerConfig) -> None:
        self.aengine = engine
        self.engine = engine.engine
        self.worker_id = worker_id
        # new at every process start: routers exclude a drained process by it, so a
        # restart under the same worker_id (a StatefulSet pod) is routed to at once
        self.instance_id = uuid.uuid4().hex[:16]
        self.address = address
        self.metrics = metrics
        self.config = config
        self.is_draining = False
        self.is_stopping = False  # SIGTERM: draining for good (no undrain)
        self.on_draining: Callable[[bool], Awaitable[None]] | None = None
        self.prompt_cache: PromptCache | None = None

    def _check_accepting(self) -> None:
        if self.is_draining:
            raise UnavailableError(f"worker {self.worker_id} is draining")

    # -- generation ------------------------------------------------------------------------

    async def Generate(self, request, context):
        self._check_accepting()
        req = request_from_pb(request, vocab_size=self.engine.model.args.vocab_size)
        request_id = req.request_id or f"w-{uuid.uuid4().hex}"
        # in a thread: a long prompt takes a while and the tokenizer releases the GIL
        try:
            prompt_ids = await asyncio.to_thread(self.engine.encode_prompt,
                                                 **req.prompt.as_engine_kwargs())
        except InvalidRequestError as e:  # the engine's prompt/messages: our text/chat...
            raise e.renamed(req.prompt.field) from e
        resumed = req.resume.output_token_ids if req.resume is not None else ()
        restore = await self._lookup([*prompt_ids, *resumed])
        stream = await self.aengine.submit(request_id, prompt_ids, req.params,
                                           resume=req.resume, restore=restore)
        first = {"num_prompt_tokens": len(prompt_ids), "num_resumed_tokens": len(resumed)}
        async for msg in self._relay(stream, first):
            yield msg

    async def _lookup(self, token_ids: list[int]) -> PrefixRestore | None:
        """A longer cached prefix from the cluster-wide prompt cache, if there is one."""
        if self.prompt_cache is None:
            return None
        return await self.prompt_cache.lookup(token_ids)

    async def _relay(self, stream, first: dict | None):
        """Engine chunks → responses; `first` fields go on the first one (if any)."""
        timer = StreamTimer(self.metrics.latency)
        finish_reason, num_generated = "cancelled", 0
        num_prompt_tokens = first.get("num_prompt_tokens") if first is not None else None
        async with contextlib.aclosing(stream):
            try:
                async for chunk in stream:
                    timer.on_tokens(len(chunk.token_ids))
                    num_generated += len(chunk.token_ids)
                    if chunk.queue_time_s is not None:
                        self.metrics.queue_time.observe(chunk.queue_time_s)
                    extra = {}
                    if first is not None:
                        extra, first = {**first, "worker_id": self.worker_id}, None
                    yield chunk_to_pb(dataclasses.replace(chunk, **extra) if extra else chunk)
                    finish_reason = chunk.finish_reason or finish_reason
            finally:
                timer.on_finish()
                self.metrics.requests.labels(finish_reason).inc()
                self.metrics.request_generation_tokens.observe(num_generated)
                if num_prompt_tokens is not None:
                    self.metrics.request_prompt_tokens.observe(num_prompt_tokens)

    async def Abort(self, request, context):
        return common_pb2.AbortResponse(found=await self.aengine.abort(request.request_id))

    async def Info(self, request, context):
        return record_to_info(self.record())

    # -- per-sequence state: export / import -----------------------------------------------

    async def ExportSequence(self, request, context):
        kind = kind_from_pb(request.kind)
        checkpoints = []
        if request.with_checkpoints and self.prompt_cache is not None:
            hashes = await self.aengine.call(
                lambda: self.engine.checkpoints.checkpoint_hashes(request.request_id))
            checkpoints = await self.prompt_cache.fetch_checkpoints(hashes)
        snap = await self.aengine.export(request.request_id, kind, request.pause)
        sent = False
        try:
            chunks = await asyncio.to_thread(
                lambda: list(iter_chunks(snap, key=self.config.cluster_key)))
            for data in chunks:
                yield common_pb2.SnapshotChunk(data=data)
            self.metrics.snapshot_bytes.labels("export").inc(sum(map(len, chunks)))
            sent = True
        finally:
            if request.pause and not sent:  # the puller went away: carry on here
                await self.aengine.commit_export(request.request_id, False)
        for part, raw in enumerate(checkpoints, start=1):
            for i in range(0, len(raw), CHUNK_BYTES):
                yield common_pb2.SnapshotChunk(data=raw[i:i + CHUNK_BYTES], part=part)

    async def CommitExport(self, request, context):
        found = await self.aengine.commit_export(request.request_id, request.commit)
        return worker_pb2.CommitExportResponse(found=found)

    async def ImportSequence(self, request, context):
        self._check_accepting()
        kind = kind_from_pb(request.kind)
        if not request.source_address or not request.request_id:
            raise InvalidRequestError("source_address", "source_address and request_id are "
                                                        "required")
        _check_address(request.source_address)
        async with rpc.channel(request.source_address, tls=rpc.dial_tls(self.config.tls),
                               metadata=caller_metadata(self.config.cluster_key)) as ch:
            source = worker_pb2_grpc.WorkerStub(ch)
            try:
                snap, size = await self._pull(source, request.request_id, kind)
                stream = await self._submit_import(snap)
            except BaseException:
                await _commit(source, request.request_id, False)
                raise
            await _commit(source, request.request_id, True)
        self.metrics.imports.inc()
        async for msg in self._relay_import(snap, stream, size):
            yield msg

    async def _pull(self, source, request_id: str, kind) -> tuple[Snapshot, int]:
        assembler = Assembler(self.config.max_snapshot_bytes, self.config.cluster_key)
        export = worker_pb2.ExportSequenceRequest(request_id=request_id, kind=kind,
                                                  pause=True)
        try:
            async for chunk in source.ExportSequence(export):
                assembler.add(chunk.data)
        except grpc.aio.AioRpcError as e:
            raise rpc.UpstreamError.from_rpc(e, "source worker: ") from e
        size = len(assembler.buffer)
        self.metrics.snapshot_bytes.labels("import").inc(size)
        return await asyncio.to_thread(assembler.snapshot), size

    async def RestoreSequence(self, request_iterator, context):
        self._check_accepting()
        parts = await _assemble_parts(request_iterator, self.config.max_snapshot_bytes)
        key = self.config.cluster_key
        snap, *checkpoints = await asyncio.to_thread(lambda: [decode(p, key) for p in parts])
        for checkpoint in checkpoints:  # all checked before anything is imported
            self.engine.checkpoints.check_checkpoint(checkpoint, snap.token_ids)
        stream = await self._submit_import(snap)
        self.metrics.imports.inc()
        if checkpoints:
            captures = await self.aengine.call(lambda: self._adopt(snap.request_id,
                                                                   checkpoints))
            if self.prompt_cache is not None:
                self.prompt_cache.publish(captures)
        async for msg in self._relay_import(snap, stream, sum(map(len, parts))):
            yield msg

    def _adopt(self, request_id: str, checkpoints: list[Snapshot]) -> list:
        """In the engine thread: the restored sequence takes its checkpoints back."""
        seq = self.engine.scheduler.get(request_id)
        return [] if seq is None else self.engine.checkpoints.adopt(seq, checkpoints)

    async def _submit_import(self, snap: Snapshot):
        """A snapshot without every group's KV is recomputed, after the longest prefix
        the prompt cache has."""
        restore = None if is_complete(snap) else await self._lookup(snap.token_ids)
        return await self.aengine.submit_import(snap, restore=restore)

    async def _relay_import(self, snap: Snapshot, stream, size: int):
        """An acknowledgement first (no token), then the continuation."""
        yield common_pb2.GenerateResponse(
            request_id=snap.request_id, worker_id=self.worker_id, seed=snap.seed,
            num_prompt_tokens=snap.num_prompt_tokens,
            num_resumed_tokens=len(snap.token_ids) - snap.num_prompt_tokens,
            snapshot_bytes=size)
        async for msg in self._relay(stream, None):
            yield msg

    async def SetDraining(self, request, context):
        if self.is_stopping and not request.draining:
            raise PreconditionError(f"worker {self.worker_id} is stopping")
        self.is_draining = request.draining
        if self.on_draining is not None:
            await self.on_draining(request.draining)
        load = self.engine.load()
        return worker_pb2.SetDrainingResponse(
            num_sequences=load.num_running + load.num_waiting)

    def record(self) -> WorkerRecord:
        info, load = self.engine.info(), self.engine.load()
        return WorkerRecord(
            worker_id=self.worker_id, address=self.address, model=info["model"],
            fingerprint=info["fingerprint"], architecture=info["architecture"],
            dtype=info["dtype"], device=info["device"], max_model_len=info["max_model_len"],
            slots=info["slots"], block_size=info["block_size"],
            attention_backend=info["attention_backend"], version=slotmesh_version(),
            num_running=load.num_running, num_waiting=load.num_waiting,
            kv_blocks_free=load.kv_blocks_free, kv_blocks_total=load.kv_blocks_total,
            heartbeat_ms=now_ms(), draining=self.is_draining, instance_id=self.instance_id,
            weights=info["weights"],
        )


async def _assemble_parts(chunks, max_bytes: int) -> list[bytearray]:
    """A sequence's snapshot (part 0) and its checkpoints (parts 1, 2, … in order), all
    within max_bytes together."""
    parts: list[Assembler] = []
    async for chunk in chunks:
        if chunk.part == len(parts):
            left = max_bytes - sum(len(a.buffer) for a in parts)
            parts.append(Assembler(left))
        elif chunk.part != len(parts) - 1:
            raise InvalidRequestError("part", f"chunk of part {chunk.part} after part "
                                              f"{len(parts) - 1}; parts come whole, in order")
        parts[-1].add(chunk.data)
    if not parts:
        raise InvalidRequestError("snapshot", "no data")
    return [a.buffer for a in parts]


def _check_address(address: str) -> None:
    """A peer worker's host:port, as workers register it; nothing else is dialled (no
    schemes, paths or unix sockets)."""
    host, _, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not (host and port.isdigit() and 0 < int(port) < 65536
            and all(ch.isalnum() or ch in ".-:" for ch in host)):
        raise InvalidRequestError("source_address", f"{address[:100]!r} is not a worker's "
                                                    "host:port")


async def _commit(source, request_id: str, commit: bool) -> None:
    """Tell the source what became of its paused export; it may be gone (then the
    router's cancelled stream ends it there)."""
    try:
        await source.CommitExport(worker_pb2.CommitExportRequest(
            request_id=request_id, commit=commit), timeout=10)
    except grpc.aio.AioRpcError as e:
        log.warning("could not %s export of %s on the source: %s",
                    "commit" if commit else "call off", request_id, e.details())


class Heartbeat:
    """Renews the worker's registry key every ttl/3; logs outages once each."""

    def __init__(self, store: RedisStore, service: WorkerService, ttl_s: float) -> None:
        self.store, self.service, self.ttl_s = store, service, ttl_s
        self.is_registered = False
        self._periodic = Periodic(self.beat, ttl_s / 3, "heartbeat")

    async def start(self) -> None:
        await self.beat()
        self._periodic.start()

    async def beat(self) -> None:
        try:
            await self.store.register_worker(self.service.record(), self.ttl_s)
        except StoreUnavailableError as e:
            if self.is_registered:
                log.warning("heartbeat failed; retrying every %.1f s: %s", self.ttl_s / 3, e)
            self.is_registered = False
            return
        if not self.is_registered:
            log.info("registered as %s (instance %s) at %s", self.service.worker_id,
                     self.service.instance_id, self.service.address)
        self.is_registered = True

    async def stop(self) -> None:
        await self._periodic.stop()
        try:
            await self.store.deregister_worker(self.service.worker_id)
        except StoreUnavailableError as e:
            log.warning("could not deregister (the key expires by itself): %s", e)


async def serve(engine_config: EngineConfig, config: ServerConfig,
                progress: Progress = silent) -> int:
    """Run the worker until SIGTERM/SIGINT; return the process exit code. `progress`
    hears the model load and warmup (worker/progress.py)."""
    store = await RedisStore.connect(config.redis_url,  # fail fast, before loading
                                     tls=config.redis_tls, cluster_key=config.cluster_key)
    try:
        engine = await asyncio.to_thread(LLMEngine, engine_config, progress=progress)
        return await _serve_engine(AsyncEngine(engine, min_step_s=config.min_step_s),
                                   store, config)
    finally:
        await store.close()


async def _serve_engine(aengine: AsyncEngine, store: RedisStore, config: ServerConfig) -> int:
    server = rpc.make_server(_caller_auth(config))
    port = rpc.bind(server, config.host, config.port, config.tls)
    address = config.advertise_address or f"{config.host}:{port}"
    worker_id = config.worker_id or f"{socket.gethostname()}-{port}"
    info = aengine.engine.info()
    metrics = WorkerMetrics(aengine.engine.load, model_name=info["model"],
                            info={"fingerprint": info["fingerprint"], "dtype": info["dtype"],
                                  "device": info["device"], "worker_id": worker_id})
    service = WorkerService(aengine, worker_id, address, metrics, config)
    worker_pb2_grpc.add_WorkerServicer_to_server(service, server)
    health = rpc.add_health_and_reflection(server, [SERVICE_NAME])
    metrics_address = None
    if config.metrics_port is not None:
        _httpd, mport = serve_metrics(metrics.registry, config.host, config.metrics_port)
        metrics_address = f"{config.host}:{mport}"
    await aengine.start()
    await server.start()
    heartbeat = Heartbeat(store, service, config.heartbeat_ttl_s)

    async def on_draining(draining: bool) -> None:
        await rpc.set_serving(health, [SERVICE_NAME], not draining)
        await heartbeat.beat()  # routers see the flag now, not at the next beat

    service.on_draining = on_draining
    checkpoints = aengine.engine.config.checkpoints
    if config.prompt_cache_bytes > 0:
        service.prompt_cache = PromptCache(
            store, aengine, metrics.prompt_cache, max_bytes=config.prompt_cache_bytes,
            ttl_s=config.prompt_cache_ttl_s,
            min_tokens=checkpoints.min_step_tokens if checkpoints else 0,
            key=config.cluster_key)
        aengine.on_captures = service.prompt_cache.publish
        await service.prompt_cache.start()
    await heartbeat.start()
    await rpc.set_serving(health, [SERVICE_NAME], True)
    stop = shutdown_requested()  # before the ready line: see its docstring
    announce_ready(address, metrics_address)
    await stop.wait()
    await _drain(service, config)
    await heartbeat.stop()
    await server.stop(1.0)
    await aengine.stop()
    if service.prompt_cache is not None:
        await service.prompt_cache.close()
    return 0


def _caller_auth(config: ServerConfig) -> list:
    """The caller check of a secured worker; none on an open one (local development)."""
    require_cert = config.tls is not None and config.tls.require_client_cert
    if not (config.cluster_key or require_cert):
        return []
    return [CallerAuthInterceptor(cluster_key=config.cluster_key,
                                  require_client_cert=require_cert)]


async def _drain(service: WorkerService, config: ServerConfig) -> None:
    """SIGTERM: take no new work, ask the router to migrate what runs here (Kubernetes'
    preStop path), then wait for what is left, up to the grace period."""
    deadline = time.monotonic() + config.shutdown_grace_s
    service.is_stopping = service.is_draining = True
    await service.on_draining(True)
    if config.router_address:
        try:
            async with rpc.channel(config.router_address, config.router_token,
                                   tls=rpc.dial_tls(config.tls)) as ch:
                resp = await router_pb2_grpc.RouterStub(ch).Drain(
                    router_pb2.DrainRequest(worker_id=service.worker_id),
                    timeout=config.shutdown_grace_s)
            log.info("drained through the router: %d migrated, %d not", resp.num_migrated,
                     resp.num_failed)
        except grpc.aio.AioRpcError as e:
            log.warning("drain through %s failed (%s); waiting for streams to finish",
                        config.router_address, e.details())
    while time.monotonic() < deadline:
        load = service.engine.load()
        if load.num_running + load.num_waiting + len(service.engine.scheduler.paused) == 0:
            return
        await asyncio.sleep(0.05)
    log.warning("grace period over with sequences still running; they are cut off")
