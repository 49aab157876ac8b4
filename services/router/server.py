"""The Router gRPC service: validate, choose a worker, relay its stream.

Client cancellation and deadlines reach the worker: the worker call carries the client's
remaining time, and when the client goes away the relay task is cancelled, which
cancels the worker call, which aborts the sequence there and frees its KV blocks.
A worker that cannot be reached before it produced anything is skipped for the next
candidate; a worker lost mid-stream ends the stream with UNAVAILABLE.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field

import grpc

from protos.slotmesh.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2_grpc
from services import rpc
from services.convert import GenerationRequest, params_to_pb, record_to_info, request_from_pb
from services.metadata.records import SequenceRecord
from services.metadata.store import RedisStore, StoreUnavailableError, now_ms
from services.metadata.writer import MetadataWriter
from services.metrics import RouterMetrics, StreamTimer, serve_metrics
from services.process import announce_ready, wait_for_signal
from services.router.config import RouterConfig
from services.router.policy import (
    Candidate,
    LeastLoaded,
    PrefixAffinity,
    RouteRequest,
    RoutingPolicy,
)
from services.router.prefix import prefix_hashes
from services.router.registry import WorkerRegistry
from worker.errors import InvalidRequestError, NotFoundError, UnavailableError
from worker.sampling_params import SamplingParams

log = logging.getLogger(__name__)

SERVICE_NAME = "slotmesh.v1.Router"
METADATA_INTERVAL_S = 0.25  # tokens-emitted updates per stream, at most this often
_STATUS_TO_PB = {"waiting": router_pb2.SEQUENCE_STATUS_WAITING,
                 "running": router_pb2.SEQUENCE_STATUS_RUNNING,
                 "migrating": router_pb2.SEQUENCE_STATUS_MIGRATING}


class _WorkerUnreachableError(Exception):
    """The chosen worker did not answer before producing anything: try another."""


class _WorkerFullError(Exception):
    """The chosen worker's queue is full (RESOURCE_EXHAUSTED) before anything was
    produced: try another; when every worker is full the client gets that status."""

    def __init__(self, error: rpc.UpstreamError) -> None:
        self.error = error


@dataclass(slots=True)
class _Stream:
    """One relayed sequence, as this router knows it."""

    request: GenerationRequest
    prompt_hash: str
    worker_id: str = ""
    worker_address: str = ""
    status: str = "waiting"
    num_tokens_emitted: int = 0
    last_write: float = field(default=0.0)

    def record(self, router_id: str) -> SequenceRecord:
        return SequenceRecord(
            request_id=self.request.request_id, worker_id=self.worker_id,
            router_id=router_id, status=self.status, prompt_hash=self.prompt_hash,
            num_tokens_emitted=self.num_tokens_emitted, params=_params_dict(
                self.request.params), updated_ms=now_ms())


def _params_dict(params: SamplingParams) -> dict:
    d = asdict(params)
    d["logit_bias"] = [list(x) for x in params.logit_bias]
    d["stop"], d["stop_token_ids"] = list(params.stop), list(params.stop_token_ids)
    return d


def _params_from_dict(d: dict) -> SamplingParams | None:
    try:
        d = {**d, "logit_bias": tuple(tuple(x) for x in d["logit_bias"]),
             "stop": tuple(d["stop"]), "stop_token_ids": tuple(d["stop_token_ids"])}
        return SamplingParams(**d)
    except (KeyError, TypeError, ValueError):
        return None


class RouterService(router_pb2_grpc.RouterServicer):
    def __init__(self, config: RouterConfig, router_id: str, store: RedisStore,
                 registry: WorkerRegistry, writer: MetadataWriter, policy: RoutingPolicy,
                 metrics: RouterMetrics) -> None:
        self.config = config
        self.router_id = router_id
        self.store = store
        self.registry = registry
        self.writer = writer
        self.policy = policy
        self.metrics = metrics
        self.streams: dict[str, _Stream] = {}
        self.num_inflight: Counter[str] = Counter()
        self._channels: dict[str, tuple[grpc.aio.Channel, worker_pb2_grpc.WorkerStub]] = {}

    # -- Generate --------------------------------------------------------------------------

    async def Generate(self, request, context):
        req = request_from_pb(request, vocab_size=None)
        request_id = req.request_id or f"r-{uuid.uuid4().hex}"
        if request_id in self.streams:
            raise InvalidRequestError("request_id", f"{request_id!r} is already running")
        req = GenerationRequest(request_id=request_id, prompt=req.prompt, params=req.params)
        forward = common_pb2.GenerateRequest()
        forward.CopyFrom(request)
        forward.request_id = request_id
        hashes, prompt_hash = prefix_hashes(req.prompt)
        route = RouteRequest(prefix_hashes=tuple(hashes),
                             prefix_owners=tuple(await self._prefix_owners(hashes)))
        stream = _Stream(req, prompt_hash)
        self.streams[request_id] = stream
        timer = StreamTimer(self.metrics.latency)
        self.metrics.streams.inc()
        finish_reason = "cancelled"
        try:
            tried: set[str] = set()
            full: rpc.UpstreamError | None = None
            while True:
                candidate = self._choose(route, tried, full)
                tried.add(candidate.worker_id)
                try:
                    async for msg in self._relay(candidate, forward, route, stream, context):
                        timer.on_tokens(len(msg.token_ids))
                        if msg.finish_reason:
                            finish_reason = common_pb2.FinishReason.Name(msg.finish_reason)
                        yield msg
                    break
                except _WorkerUnreachableError:
                    log.warning("worker %s unreachable; trying another", candidate.worker_id)
                    self.registry.exclude(candidate.worker_id, self.config.unreachable_backoff_s)
                except _WorkerFullError as e:
                    full = e.error
        finally:
            del self.streams[request_id]
            self.writer.delete(request_id)
            timer.on_finish()
            self.metrics.streams.dec()
            self.metrics.requests.labels(finish_reason).inc()

    def _choose(self, route: RouteRequest, tried: set[str],
                full: rpc.UpstreamError | None) -> Candidate:
        candidates = [Candidate(record=r, num_inflight=self.num_inflight[r.worker_id])
                      for r in self.registry.routable() if r.worker_id not in tried]
        chosen = self.policy.select(route, candidates)
        if chosen is None and full is not None:
            raise full
        if chosen is None:
            raise UnavailableError("no worker available" + (
                f" (tried {', '.join(sorted(tried))})" if tried else ""))
        if route.prefix_hashes:
            self.metrics.prefix_queries.inc()
            if any(o == chosen.worker_id for o in route.prefix_owners):
                self.metrics.prefix_hits.inc()
        return chosen

    async def _prefix_owners(self, hashes: list[str]) -> list[str | None]:
        """Owners from Redis; during an outage, no affinity (least loaded still works)."""
        try:
            return await self.store.prefix_owners(hashes)
        except StoreUnavailableError:
            return [None] * len(hashes)

    async def _relay(self, candidate: Candidate, forward, route: RouteRequest,
                     stream: _Stream, context):
        worker = candidate.record
        stream.worker_id, stream.worker_address = worker.worker_id, worker.address
        stream.status = "waiting"
        self.writer.put(stream.record(self.router_id))
        self.writer.record_prefixes(list(route.prefix_hashes), worker.worker_id)
        self.metrics.routed.labels(worker.worker_id).inc()
        self.num_inflight[worker.worker_id] += 1
        call = self._stub(worker.address).Generate(forward, timeout=context.time_remaining())
        received = False
        try:
            async for msg in call:
                received = True
                self._on_chunk(stream, msg)
                yield msg
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                if not received:
                    raise _WorkerUnreachableError from e
                raise UnavailableError(
                    f"worker {worker.worker_id} went away after {stream.num_tokens_emitted} "
                    f"tokens: {e.details()}") from e
            error = rpc.UpstreamError.from_rpc(e)
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not received:
                raise _WorkerFullError(error) from e
            raise error from e
        finally:
            call.cancel()  # no-op when finished; aborts the sequence when we were cancelled
            self.num_inflight[worker.worker_id] -= 1

    def _on_chunk(self, stream: _Stream, msg) -> None:
        stream.num_tokens_emitted += len(msg.token_ids)
        now = time.monotonic()
        if stream.status != "running" or now - stream.last_write >= METADATA_INTERVAL_S:
            stream.status = "running"
            stream.last_write = now
            self.writer.put(stream.record(self.router_id))

    def _stub(self, address: str) -> worker_pb2_grpc.WorkerStub:
        if address not in self._channels:
            ch = rpc.channel(address)
            self._channels[address] = (ch, worker_pb2_grpc.WorkerStub(ch))
        return self._channels[address][1]

    async def close_channels(self) -> None:
        for ch, _stub in self._channels.values():
            await ch.close()
        self._channels.clear()

    # -- the other RPCs --------------------------------------------------------------------

    async def Abort(self, request, context):
        record = await self._find(request.request_id)
        worker = self.registry.workers.get(record.worker_id)
        address = (self.streams[request.request_id].worker_address
                   if request.request_id in self.streams else worker.address if worker else "")
        if not address:
            raise UnavailableError(f"worker {record.worker_id} of {request.request_id!r} "
                                   "is not in the registry")
        try:
            resp = await self._stub(address).Abort(
                common_pb2.AbortRequest(request_id=request.request_id),
                timeout=context.time_remaining())
        except grpc.aio.AioRpcError as e:
            raise rpc.UpstreamError.from_rpc(e, f"worker {record.worker_id}: ") from e
        if not resp.found:
            raise NotFoundError(f"request_id: {request.request_id!r} is not running")
        return resp

    async def GetSequence(self, request, context):
        record = await self._find(request.request_id)
        info = router_pb2.SequenceInfo(
            request_id=record.request_id, worker_id=record.worker_id,
            status=_STATUS_TO_PB.get(record.status, router_pb2.SEQUENCE_STATUS_UNSPECIFIED),
            num_tokens_emitted=record.num_tokens_emitted, prompt_hash=record.prompt_hash,
            router_id=record.router_id)
        params = _params_from_dict(record.params)
        if params is not None:
            info.params.CopyFrom(params_to_pb(params))
        return info

    async def _find(self, request_id: str) -> SequenceRecord:
        """This router's own streams first (freshest), then Redis (other routers')."""
        if not request_id:
            raise InvalidRequestError("request_id", "must not be empty")
        stream = self.streams.get(request_id)
        if stream is not None:
            return stream.record(self.router_id)
        record = await self.store.get_sequence(request_id)
        if record is None:
            raise NotFoundError(f"request_id: no running request {request_id!r}")
        return record

    async def ListWorkers(self, request, context):
        return router_pb2.ListWorkersResponse(
            workers=[record_to_info(r) for r in self.registry.routable()])


# -- the process -------------------------------------------------------------------------

async def serve(config: RouterConfig, policy: RoutingPolicy | None = None) -> int:
    """Run the router until SIGTERM/SIGINT; return the process exit code."""
    store = await RedisStore.connect(config.redis_url)  # unreachable at start: an error
    registry = WorkerRegistry(store, config.registry_poll_s)
    writer = MetadataWriter(store, sequence_ttl_s=config.sequence_ttl_s,
                            prefix_ttl_s=config.prefix_ttl_s)
    server = rpc.make_server()
    port = rpc.bind(server, config.host, config.port)
    router_id = config.router_id or f"router-{socket.gethostname()}-{port}"
    metrics = RouterMetrics(lambda: len(registry.routable()))
    policy = policy or PrefixAffinity(LeastLoaded(), config.max_load_imbalance)
    service = RouterService(config, router_id, store, registry, writer, policy, metrics)
    router_pb2_grpc.add_RouterServicer_to_server(service, server)
    health = rpc.add_health_and_reflection(server, [SERVICE_NAME])
    metrics_address = None
    if config.metrics_port is not None:
        _httpd, mport = serve_metrics(metrics.registry, config.host, config.metrics_port)
        metrics_address = f"{config.host}:{mport}"
    await registry.start()
    await writer.start()
    await server.start()
    await rpc.set_serving(health, [SERVICE_NAME], True)
    announce_ready(f"{config.host}:{port}", metrics_address)
    log.info("router %s on %s:%d, %d workers known", router_id, config.host, port,
             len(registry.workers))
    await wait_for_signal()
    await rpc.set_serving(health, [SERVICE_NAME], False)
    await server.stop(config.shutdown_grace_s)
    await writer.close()
    await registry.stop()
    await service.close_channels()
    await store.close()
    return 0

