"""The worker's gRPC service: the async engine behind grpc.aio, registered in Redis.

Protobuf is converted at this edge (services/convert.py) and nowhere deeper. The engine
task owns every sequence; this module only submits requests, relays their chunks and
reports load with a heartbeat that renews the worker's registry key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import uuid
from importlib.metadata import PackageNotFoundError, version

from protos.slotmesh.v1 import common_pb2, worker_pb2_grpc
from services import rpc
from services.convert import Chunk, chunk_to_pb, record_to_info, request_from_pb
from services.metadata.records import WorkerRecord
from services.metadata.store import RedisStore, StoreUnavailableError, now_ms
from services.metrics import StreamTimer, WorkerMetrics, serve_metrics
from services.process import announce_ready, wait_for_signal
from worker.async_engine import AsyncEngine
from worker.config import EngineConfig, ServerConfig
from worker.engine import LLMEngine, TokenChunk

log = logging.getLogger(__name__)

SERVICE_NAME = "slotmesh.v1.Worker"


def slotmesh_version() -> str:
    try:
        return version("slotmesh")
    except PackageNotFoundError:
        return "unknown"


class WorkerService(worker_pb2_grpc.WorkerServicer):
    def __init__(self, engine: AsyncEngine, worker_id: str, address: str,
                 metrics: WorkerMetrics) -> None:
        self.aengine = engine
        self.engine = engine.engine
        self.worker_id = worker_id
        self.address = address
        self.metrics = metrics

    async def Generate(self, request, context):
        req = request_from_pb(request, vocab_size=self.engine.model.args.vocab_size)
        request_id = req.request_id or f"w-{uuid.uuid4().hex}"
        prompt_ids = self.engine.encode_prompt(**req.prompt.as_engine_kwargs())
        timer = StreamTimer(self.metrics.latency)
        finish_reason = "cancelled"
        first = True
        try:
            async for chunk in self.aengine.generate(request_id, prompt_ids, req.params):
                timer.on_tokens(len(chunk.token_ids))
                yield chunk_to_pb(_chunk(chunk, len(prompt_ids) if first else 0,
                                         self.worker_id if first else ""))
                first = False
                finish_reason = chunk.finish_reason or finish_reason
        finally:
            timer.on_finish()
            self.metrics.requests.labels(finish_reason).inc()

    async def Abort(self, request, context):
        return common_pb2.AbortResponse(found=await self.aengine.abort(request.request_id))

    async def Info(self, request, context):
        return record_to_info(self.record())

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
            heartbeat_ms=now_ms(),
        )


def _chunk(chunk: TokenChunk, num_prompt_tokens: int, worker_id: str) -> Chunk:
    return Chunk(
        request_id=chunk.request_id, token_ids=tuple(chunk.token_ids), text=chunk.text,
        finish_reason=chunk.finish_reason, logprobs=tuple(chunk.logprobs or ()),
        top_logprobs=tuple(tuple(t) for t in chunk.top_logprobs or ()),
        error=chunk.error or "", num_prompt_tokens=num_prompt_tokens, worker_id=worker_id,
    )


class Heartbeat:
    """Renews the worker's registry key every ttl/3; logs outages once each."""

    def __init__(self, store: RedisStore, service: WorkerService, ttl_s: float) -> None:
        self.store, self.service, self.ttl_s = store, service, ttl_s
        self.is_registered = False
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.beat()
        self._task = asyncio.create_task(self._run(), name="heartbeat")

    async def beat(self) -> None:
        try:
            await self.store.register_worker(self.service.record(), self.ttl_s)
        except StoreUnavailableError as e:
            if self.is_registered:
                log.warning("heartbeat failed; retrying every %.1f s: %s", self.ttl_s / 3, e)
            self.is_registered = False
            return
        if not self.is_registered:
            log.info("registered as %s at %s", self.service.worker_id, self.service.address)
        self.is_registered = True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            await self.beat()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await self.store.deregister_worker(self.service.worker_id)
        except StoreUnavailableError as e:
            log.warning("could not deregister (the key expires by itself): %s", e)


async def serve(engine_config: EngineConfig, config: ServerConfig) -> int:
    """Run the worker until SIGTERM/SIGINT; return the process exit code."""
    store = await RedisStore.connect(config.redis_url)  # fail fast, before loading
    try:
        engine = await asyncio.to_thread(LLMEngine, engine_config)
        return await _serve_engine(AsyncEngine(engine), store, config)
    finally:
        await store.close()


async def _serve_engine(aengine: AsyncEngine, store: RedisStore, config: ServerConfig) -> int:
    server = rpc.make_server()
    port = rpc.bind(server, config.host, config.port)
    address = config.advertise_address or f"{config.host}:{port}"
    worker_id = config.worker_id or f"{socket.gethostname()}-{port}"
    metrics = WorkerMetrics(aengine.engine.load)
    service = WorkerService(aengine, worker_id, address, metrics)
    worker_pb2_grpc.add_WorkerServicer_to_server(service, server)
    health = rpc.add_health_and_reflection(server, [SERVICE_NAME])
    metrics_address = None
    if config.metrics_port is not None:
        _httpd, mport = serve_metrics(metrics.registry, config.host, config.metrics_port)
        metrics_address = f"{config.host}:{mport}"
    await aengine.start()
    await server.start()
    heartbeat = Heartbeat(store, service, config.heartbeat_ttl_s)
    await heartbeat.start()
    await rpc.set_serving(health, [SERVICE_NAME], True)
    announce_ready(address, metrics_address)
    await wait_for_signal()
    log.info("stopping: deregistering, then up to %.0f s for running streams",
             config.shutdown_grace_s)
    await rpc.set_serving(health, [SERVICE_NAME], False)
    await heartbeat.stop()
    await server.stop(config.shutdown_grace_s)
    await aengine.stop()
    return 0

