"""The Router gRPC service: validate, choose a worker, relay its stream; migrate and
drain.

Client cancellation and deadlines reach the worker: the worker call carries the client's
remaining time, and when the client goes away the relay task is cancelled, which
cancels the worker call, which aborts the sequence there and frees its KV blocks.
A worker that cannot be reached (or is full) before it produced anything is skipped for
the next candidate; a worker lost mid-stream is failed over by replay, and a migration
splices the target's stream in (services/router/relay.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
import uuid
from collections import Counter

import grpc

from protos.slotmesh.v1 import (
    common_pb2,
    router_pb2,
    router_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from services.local.process import announce_ready, shutdown_requested
from services.metadata.records import SequenceRecord, WorkerRecord
from services.metadata.store import RedisStore, StoreUnavailableError
from services.metadata.writer import MetadataWriter
from services.router.config import RouterConfig
from services.router.peers import RouterPeers
from services.router.policy import (
    Candidate,
    LeastLoaded,
    PrefixAffinity,
    RouteRequest,
    RoutingPolicy,
)
from services.router.prefix import prefix_hashes
from services.router.registry import WorkerRegistry
from services.router.relay import (
    Migration,
    RelayedStream,
    WorkerFullError,
    WorkerLostError,
    WorkerUnreachableError,
    adopt_target,
    pump,
    start,
)
from services.rpc import plumbing as rpc
from services.rpc.convert import (
    GenerationRequest,
    kind_from_pb,
    params_to_pb,
    record_to_info,
    request_from_pb,
)
from services.rpc.metrics import RouterMetrics, StreamTimer, serve_metrics
from services.rpc.periodic import Periodic
from services.security.auth import AuthInterceptor
from services.security.cluster_auth import caller_metadata
from worker.vocab.errors import (
    InvalidRequestError,
    NotFoundError,
    PreconditionError,
    UnavailableError,
)
from worker.vocab.sampling_params import SamplingParams
from worker.vocab.snapshot_kind import SnapshotKind

log = logging.getLogger(__name__)

SERVICE_NAME = "slotmesh.v1.Router"
METADATA_INTERVAL_S = 0.25  # tokens-emitted updates per stream, at most this often
_STATUS_TO_PB = {"waiting": router_pb2.SEQUENCE_STATUS_WAITING,
                 "running": router_pb2.SEQUENCE_STATUS_RUNNING,
                 "migrating": router_pb2.SEQUENCE_STATUS_MIGRATING}


class RouterService(router_pb2_grpc.RouterServicer):
    def __init__(self, config: RouterConfig, router_id: str, store: RedisStore,
                 registry: WorkerRegistry, writer: MetadataWriter, policy: RoutingPolicy,
                 metrics: RouterMetrics, peers: RouterPeers) -> None:
        self.config = config
        self.router_id = router_id
        self.store = store
        self.registry = registry
        self.writer = writer
        self.policy = policy
        self.metrics = metrics
        self.peers = peers
        self.streams: dict[str, RelayedStream] = {}
        self.num_inflight: Counter[str] = Counter()
        self._channels: dict[str, tuple[grpc.aio.Channel, worker_pb2_grpc.WorkerStub]] = {}

    # -- Generate --------------------------------------------------------------------------

    async def Generate(self, request, context):
        req = request_from_pb(request, vocab_size=None)
        request_id = req.request_id or f"r-{uuid.uuid4().hex}"
        if request_id in self.streams:
            raise InvalidRequestError("request_id", f"{request_id!r} is already running")
        req = dataclasses.replace(req, request_id=request_id)
        if req.resume is not None:
            req = await self._take_over(req)
        hashes, prompt_hash = prefix_hashes(req.prompt)
        route = RouteRequest(prefix_hashes=tuple(hashes),
                             prefix_owners=tuple(await self._prefix_owners(hashes)))
        stream = RelayedStream(req, prompt_hash)
        self.streams[request_id] = stream
        timer = StreamTimer(self.metrics.latency)
        self.metrics.streams.inc()
        finish_reason = "cancelled"
        try:
            await self._open(stream, route, context)
            while True:
                try:
                    async for msg in pump(stream):
                        timer.on_tokens(len(msg.token_ids))
                        self._write_progress(stream)
                        if msg.finish_reason:
                            finish_reason = common_pb2.FinishReason.Name(msg.finish_reason)
                        yield msg
                    break
                except WorkerLostError as e:
                    if not await self._adopt_after_loss(stream):
                        await self._fail_over(stream, route, context, str(e))
        finally:
            if stream.call is not None:
                stream.call.cancel()  # no-op when finished; aborts it when we were cancelled
            if stream.migration is not None:  # ended mid-migration: the target lets go too
                stream.migration.call.cancel()
                if not stream.migration.adopted.done():
                    stream.migration.adopted.set_exception(
                        UnavailableError(f"{request_id!r} ended during its migration"))
            self._count(stream.worker, -1)
            del self.streams[request_id]
            self.writer.delete(request_id)
            timer.on_finish()
            self.metrics.streams.dec()
            self.metrics.requests.labels(finish_reason).inc()

    async def _take_over(self, req: GenerationRequest) -> GenerationRequest:
        """A client resumes a stream it lost with its router (the tokens it received in
        `resume`): any router continues it. Without a seed in the request, the one the
        worker drew comes from the sequence's Redis record, so the continuation is the
        one the first worker would have produced."""
        if req.params.seed is not None or req.params.is_greedy:
            return req
        record = await self.store.get_sequence(req.request_id)
        if record is None or not record.seed:
            raise InvalidRequestError("params.seed", f"resuming {req.request_id!r} needs "
                                      "the seed it ran with and Redis has no record of it")
        log.info("taking over %s (relayed by %s) after %d tokens", req.request_id,
                 record.router_id, len(req.resume.output_token_ids))
        return dataclasses.replace(req, params=dataclasses.replace(req.params,
                                                                   seed=record.seed))

    async def _open(self, stream: RelayedStream, route: RouteRequest, context) -> None:
        """Start the worker call on the best worker that answers (before any token)."""
        tried: set[str] = set()
        full: rpc.UpstreamError | None = None
        while True:
            candidate = self._choose(route, tried, full)
            tried.add(candidate.worker_id)
            worker = candidate.record
            self._count(stream.worker, -1)
            stream.worker, stream.status = worker, "waiting"
            self._count(worker, +1)
            self.writer.put(stream.record(self.router_id))
            self.writer.record_prefixes(list(route.prefix_hashes), worker.worker_id)
            self.metrics.routed.labels(worker.worker_id).inc()
            stream.call = self._stub(worker.address).Generate(
                stream.worker_request(), timeout=context.time_remaining())
            try:
                await start(stream)
                return
            except WorkerUnreachableError:
                log.warning("worker %s unreachable; trying another", worker.worker_id)
                self.registry.exclude(worker, self.config.unreachable_backoff_s)
            except WorkerFullError as e:
                full = e.error

    async def _adopt_after_loss(self, stream: RelayedStream) -> bool:
        """The source died while its sequence was migrating: if the target has it and
        resumes exactly after what was relayed, carry on there instead of replaying."""
        if stream.migration is None:
            return False
        try:
            await adopt_target(stream)
        except WorkerLostError:
            return False
        return True

    async def _fail_over(self, stream: RelayedStream, route: RouteRequest, context,
                         reason: str) -> None:
        lost = stream.worker
        log.warning("worker %s lost %s after %d tokens (%s); replaying on another worker",
                    lost.worker_id if lost else "?", stream.request_id,
                    stream.num_tokens_emitted, reason)
        if lost is not None:
            self.registry.exclude(lost, self.config.unreachable_backoff_s)
        self.metrics.failovers.inc()
        stream.call.cancel()
        await self._open(stream, route, context)  # replays with every token sent so far

    def _count(self, worker: WorkerRecord | None, delta: int) -> None:
        if worker is not None:
            self.num_inflight[worker.worker_id] += delta

    def _put_if_relayed(self, stream: RelayedStream) -> None:
        """Write the stream's record unless the stream has ended: its delete is final."""
        if self.streams.get(stream.request_id) is stream:
            self.writer.put(stream.record(self.router_id))

    async def renew_leases(self) -> None:
        """Re-put every relayed stream's record: each is a lease that expires
        `sequence_ttl_s` after its last renewal, so a router that dies leaves its records
        for at most that long (clients resuming elsewhere read them until then)."""
        for stream in list(self.streams.values()):
            self._put_if_relayed(stream)

    def _write_progress(self, stream: RelayedStream) -> None:
        now = time.monotonic()
        if stream.status != "running" or now - stream.last_write >= METADATA_INTERVAL_S:
            stream.status = "running"
            stream.last_write = now
            self.writer.put(stream.record(self.router_id))

    def _choose(self, route: RouteRequest, tried: set[str],
                full: rpc.UpstreamError | None) -> Candidate:
        candidates = self._candidates(r for r in self.registry.routable()
                                      if r.worker_id not in tried)
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

    def _candidates(self, records) -> list[Candidate]:
        return [Candidate(record=r, num_inflight=self.num_inflight[r.worker_id])
                for r in records]

    async def _prefix_owners(self, hashes: list[str]) -> list[str | None]:
        """Owners from Redis; during an outage, no affinity (least loaded still works)."""
        try:
            return await self.store.prefix_owners(hashes)
        except StoreUnavailableError:
            return [None] * len(hashes)

    def _stub(self, address: str) -> worker_pb2_grpc.WorkerStub:
        if address not in self._channels:
            ch = rpc.channel(address, tls=rpc.dial_tls(self.config.tls),
                             metadata=caller_metadata(self.config.cluster_key))
            self._channels[address] = (ch, worker_pb2_grpc.WorkerStub(ch))
        return self._channels[address][1]

    async def close_channels(self) -> None:
        for ch, _stub in self._channels.values():
            await ch.close()
        self._channels.clear()

    # -- the other RPCs --------------------------------------------------------------------

    async def Abort(self, request, context):
        record = await self._find(request.request_id)
        stream = self.streams.get(request.request_id)
        worker = stream.worker if stream else self.registry.workers.get(record.worker_id)
        address = worker.address if worker else ""
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
        with contextlib.suppress(InvalidRequestError):  # a damaged record: no params
            info.params.CopyFrom(params_to_pb(SamplingParams.from_dict(record.params)))
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

    # -- migration ---------------------------------------------------------------------------

    async def Migrate(self, request, context):
        kind = kind_from_pb(request.kind)
        if request.request_id not in self.streams and not request.forwarded:
            return await self._forward_migrate(request, context)
        return await self.migrate(request.request_id, request.target_worker_id, kind)

    async def _forward_migrate(self, request, context) -> router_pb2.MigrateResponse:
        """Another router relays it: its Redis record names that router; forward once."""
        record = await self._find(request.request_id)
        if record.router_id == self.router_id:  # a stale record of a stream that ended
            raise NotFoundError(f"request_id: no running request {request.request_id!r}")
        address = await self.peers.address_of(record.router_id)
        if address is None:
            raise UnavailableError(f"router {record.router_id} relaying "
                                   f"{request.request_id!r} is gone")
        forward = router_pb2.MigrateRequest()
        forward.CopyFrom(request)
        forward.forwarded = True
        try:
            return await self.peers.stub(address).Migrate(
                forward, timeout=context.time_remaining())
        except grpc.aio.AioRpcError as e:
            raise rpc.UpstreamError.from_rpc(e, f"router {record.router_id}: ") from e

    async def migrate(self, request_id: str, target_id: str, kind: SnapshotKind
                      ) -> router_pb2.MigrateResponse:
        """Have the target pull the sequence from its worker; return once the client's
        stream continues from the target."""
        stream = self.streams.get(request_id)
        if stream is None:
            raise NotFoundError(f"request_id: this router relays no {request_id!r}")
        if stream.migration is not None or stream.worker is None:
            raise PreconditionError(f"{request_id!r} is being started or migrated already")
        source, target = stream.worker, self._migration_target(stream, target_id)
        t0 = time.perf_counter()
        call = self._stub(target.address).ImportSequence(worker_pb2.ImportSequenceRequest(
            source_address=source.address, request_id=request_id, kind=int(kind)))
        migration = Migration(target=target, call=call,
                              ready=asyncio.get_running_loop().create_future())
        stream.migration, stream.status = migration, "migrating"
        self._put_if_relayed(stream)
        try:
            ack = await call.read()
            if ack is grpc.aio.EOF:
                raise UnavailableError(f"target {target.worker_id} ended the import early")
        except (grpc.aio.AioRpcError, UnavailableError) as e:
            error = (rpc.UpstreamError.from_rpc(e, f"target {target.worker_id}: ")
                     if isinstance(e, grpc.aio.AioRpcError) else e)
            return await self._migration_failed(stream, migration, source, error)
        migration.ready.set_result(ack)
        # the target confirmed to the source already; repeat it (idempotent) so a lost
        # confirmation cannot leave the source paused with the relay waiting on it
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self._stub(source.address).CommitExport(
                worker_pb2.CommitExportRequest(request_id=request_id, commit=True), timeout=10)
        await migration.adopted  # the relay has switched to the target
        self._count(source, -1)
        self._count(target, +1)
        self._put_if_relayed(stream)  # it may have ended meanwhile: no record after that
        duration = time.perf_counter() - t0
        self.metrics.migrations.labels("ok").inc()
        self.metrics.migration_seconds.observe(duration)
        self.metrics.migration_bytes.inc(ack.snapshot_bytes)
        log.info("migrated %s from %s to %s at %d tokens in %.3f s (%d bytes)", request_id,
                 source.worker_id, target.worker_id, ack.num_resumed_tokens, duration,
                 ack.snapshot_bytes)
        return router_pb2.MigrateResponse(
            source_worker_id=source.worker_id, target_worker_id=target.worker_id,
            num_tokens_at_migration=ack.num_resumed_tokens, duration_s=duration,
            snapshot_bytes=ack.snapshot_bytes)

    async def _migration_failed(self, stream: RelayedStream, migration: Migration,
                                source: WorkerRecord, error: Exception):
        """The target could not take it: the source resumes (if it let go already, the
        relay sees MIGRATED with a failed target and fails over)."""
        migration.call.cancel()
        migration.ready.set_exception(error)
        migration.ready.exception()  # retrieved: the relay may never look
        try:
            await self._stub(source.address).CommitExport(
                worker_pb2.CommitExportRequest(request_id=stream.request_id, commit=False),
                timeout=10)
        except grpc.aio.AioRpcError as e:
            log.warning("could not resume %s on %s: %s", stream.request_id,
                        source.worker_id, e.details())
        if stream.migration is migration and not migration.adopted.done():
            stream.migration = None
            stream.status = "running"
        self.metrics.migrations.labels("failed").inc()
        raise error

    def _migration_target(self, stream: RelayedStream, target_id: str) -> WorkerRecord:
        others = [r for r in self.registry.routable()
                  if r.worker_id != stream.worker.worker_id]
        if target_id:
            for r in others:
                if r.worker_id == target_id:
                    return r
            raise NotFoundError(f"target_worker_id: no routable worker {target_id!r} other "
                                "than the sequence's own")
        route = RouteRequest(prefix_hashes=(), prefix_owners=())
        chosen = self.policy.select(route, self._candidates(others))
        if chosen is None:
            raise UnavailableError("no other worker to migrate to")
        return chosen.record

    async def Drain(self, request, context):
        worker_id = _worker_id(request)
        record = await self.registry.lookup(worker_id)
        if record is None and not request.forwarded:
            raise NotFoundError(f"worker_id: no worker {worker_id!r} in the registry")
        local = self._drain_local(worker_id, record)
        if request.forwarded:
            migrated, failed = await local
            return router_pb2.DrainResponse(num_migrated=migrated, num_failed=failed)
        # every router moves the streams it relays, at once
        forward = router_pb2.DrainRequest(worker_id=worker_id, forwarded=True)
        (migrated, failed), peers = await asyncio.gather(
            local, self.peers.forward("Drain", forward, context.time_remaining()))
        return router_pb2.DrainResponse(
            num_migrated=migrated + sum(r.num_migrated for r in peers),
            num_failed=failed + sum(r.num_failed for r in peers))

    async def _drain_local(self, worker_id: str, record: WorkerRecord | None
                           ) -> tuple[int, int]:
        """Stop routing to the worker's current process and migrate every stream this
        router relays on it. record None: a forwarded drain of a worker this router's
        registry does not hold (it may still relay streams there)."""
        if record is not None:
            self.registry.exclude(record, self.config.drain_exclusion_s)
            with contextlib.suppress(grpc.aio.AioRpcError):  # others learn it from Redis
                await self._stub(record.address).SetDraining(
                    worker_pb2.SetDrainingRequest(draining=True), timeout=5)
        ids = [s.request_id for s in self.streams.values()
               if s.worker is not None and s.worker.worker_id == worker_id]
        results = await asyncio.gather(*(self.migrate(i, "", SnapshotKind.FULL) for i in ids),
                                       return_exceptions=True)
        failed = [(i, r) for i, r in zip(ids, results, strict=True)
                  if isinstance(r, BaseException)]
        for request_id, error in failed:
            log.warning("drain of %s: %s stays: %s", worker_id, request_id, error)
        return len(ids) - len(failed), len(failed)

    async def Undrain(self, request, context):
        worker_id = _worker_id(request)
        was_excluded = self.registry.include(worker_id)
        if request.forwarded:  # the receiving router told the worker already
            await self.registry.refresh()
            return router_pb2.UndrainResponse(was_draining=was_excluded)
        record = await self.registry.lookup(worker_id)
        if record is None:
            raise NotFoundError(f"worker_id: no worker {worker_id!r} in the registry")
        try:  # the worker re-registers without the draining flag before it answers
            await self._stub(record.address).SetDraining(
                worker_pb2.SetDrainingRequest(draining=False),
                timeout=context.time_remaining())
        except grpc.aio.AioRpcError as e:
            raise rpc.UpstreamError.from_rpc(e, f"worker {worker_id}: ") from e
        await self.registry.refresh()  # routable here now, not at the next poll
        forward = router_pb2.UndrainRequest(worker_id=worker_id, forwarded=True)
        peers = await self.peers.forward("Undrain", forward, context.time_remaining())
        log.info("worker %s returned to routing", worker_id)
        return router_pb2.UndrainResponse(
            was_draining=was_excluded or record.draining or any(r.was_draining
                                                                for r in peers))

    async def ListWorkers(self, request, context):
        return router_pb2.ListWorkersResponse(
            workers=[record_to_info(r) for r in self.registry.routable()])


def _worker_id(request) -> str:
    if not request.worker_id:
        raise InvalidRequestError("worker_id", "must not be empty")
    return request.worker_id


# -- the process -------------------------------------------------------------------------

async def serve(config: RouterConfig, policy: RoutingPolicy | None = None) -> int:
    """Run the router until SIGTERM/SIGINT; return the process exit code."""
    # unreachable at start: an error
    store = await RedisStore.connect(config.redis_url, tls=config.redis_tls,
                                     cluster_key=config.cluster_key)
    registry = WorkerRegistry(store, config.registry_poll_s)
    writer = MetadataWriter(store, sequence_ttl_s=config.sequence_ttl_s,
                            prefix_ttl_s=config.prefix_ttl_s)
    auth = [AuthInterceptor(list(config.auth_tokens))] if config.auth_tokens else []
    server = rpc.make_server(auth)
    port = rpc.bind(server, config.host, config.port, config.tls)
    router_id = config.router_id or f"router-{socket.gethostname()}-{port}"
    address = config.advertise_address or f"{config.host}:{port}"
    peers = RouterPeers(store, router_id, address, config.heartbeat_ttl_s, config.peer_token,
                        tls=rpc.dial_tls(config.tls))
    metrics = RouterMetrics(lambda: len(registry.routable()), lambda: writer.num_pending,
                            lambda: store.num_unverified, lambda: registry.num_polls)
    policy = policy or PrefixAffinity(LeastLoaded(), config.max_load_imbalance)
    service = RouterService(config, router_id, store, registry, writer, policy, metrics,
                            peers)
    router_pb2_grpc.add_RouterServicer_to_server(service, server)
    health = rpc.add_health_and_reflection(server, [SERVICE_NAME])
    metrics_address = None
    if config.metrics_port is not None:
        _httpd, mport = serve_metrics(metrics.registry, config.host, config.metrics_port)
        metrics_address = f"{config.host}:{mport}"
    leases = Periodic(service.renew_leases, config.sequence_ttl_s / 3, "sequence-leases")
    await registry.start()
    await writer.start()
    leases.start()
    await server.start()
    await peers.start()
    await rpc.set_serving(health, [SERVICE_NAME], True)
    stop = shutdown_requested()  # before the ready line: see its docstring
    announce_ready(f"{config.host}:{port}", metrics_address)
    log.info("router %s on %s:%d, %d workers known", router_id, config.host, port,
             len(registry.workers))
    await stop.wait()
    await rpc.set_serving(health, [SERVICE_NAME], False)
    await peers.stop()
    await server.stop(config.shutdown_grace_s)
    await leases.stop()
    await writer.close()
    await registry.stop()
    await service.close_channels()
    await store.close()
    return 0

