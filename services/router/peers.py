"""Routers find each other through Redis, so any replica answers Migrate and Drain.

A stream is relayed by exactly one router (the one the client called); its
`slotmesh:seq:{id}` record names that router by id. Each router registers
`slotmesh:router:{id}` = its address with an expiring heartbeat (like a worker), so a
router that receives Migrate for a sequence it does not relay looks up the relaying
router's address and forwards the call there (one hop, marked `forwarded`), and a
router that receives Drain (or Undrain) acts on its own streams and exclusions and
forwards the call to every other live router. The relaying router stays the only one
that touches its stream: no cross-process locking, no pub/sub, and nothing to clean up
when a router dies (its key expires and its streams ended with its client connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from protos.slotmesh.v1 import router_pb2_grpc
from services.metadata.records import RouterRecord
from services.metadata.store import RedisStore, StoreUnavailableError, now_ms
from services.rpc import plumbing as rpc
from services.rpc.periodic import Periodic

log = logging.getLogger(__name__)


class RouterPeers:
    """This router's entry in the Redis router registry, and calls to the others."""

    def __init__(self, store: RedisStore, router_id: str, address: str, ttl_s: float,
                 token: str | None = None, tls: rpc.ChannelTls | None = None) -> None:
        self.store = store
        self.token = token  # peers that check bearer tokens need an admin one
        self.tls = tls
        self.router_id = router_id
        self.address = address
        self.ttl_s = ttl_s
        self._heartbeat = Periodic(self.beat, ttl_s / 3, "router-heartbeat")
        self._channels: dict[str, tuple[grpc.aio.Channel, router_pb2_grpc.RouterStub]] = {}

    async def start(self) -> None:
        await self.beat()
        self._heartbeat.start()

    async def beat(self) -> None:
        record = RouterRecord(router_id=self.router_id, address=self.address,
                              heartbeat_ms=now_ms())
        try:
            await self.store.register_router(record, self.ttl_s)
        except StoreUnavailableError as e:
            log.warning("router heartbeat failed (peers cannot forward to us until Redis "
                        "is back): %s", e)

    async def stop(self) -> None:
        await self._heartbeat.stop()
        with contextlib.suppress(StoreUnavailableError):  # the key expires by itself
            await self.store.deregister_router(self.router_id)
        for ch, _stub in self._channels.values():
            await ch.close()
        self._channels.clear()

    async def others(self) -> list[RouterRecord]:
        """Every other live router (Redis down: none, so a drain stays local)."""
        try:
            routers = await self.store.list_routers()
        except StoreUnavailableError as e:
            log.warning("router registry unreachable; acting alone: %s", e)
            return []
        return [r for r in routers if r.router_id != self.router_id]

    async def address_of(self, router_id: str) -> str | None:
        for r in await self.store.list_routers():
            if r.router_id == router_id:
                return r.address
        return None

    def stub(self, address: str) -> router_pb2_grpc.RouterStub:
        if address not in self._channels:
            ch = rpc.channel(address, self.token, tls=self.tls)
            self._channels[address] = (ch, router_pb2_grpc.RouterStub(ch))
        return self._channels[address][1]

    async def forward(self, method: str, request, timeout_s: float | None) -> list:
        """Call `method` (Drain, Undrain: the request marked forwarded) on every other
        live router at once; their responses. A peer that cannot be reached is logged
        and left out (for a drain, the worker's own SIGTERM wait still covers its
        streams)."""
        peers = await self.others()
        results = await asyncio.gather(
            *(getattr(self.stub(p.address), method)(request, timeout=timeout_s)
              for p in peers),
            return_exceptions=True)
        answered = []
        for peer, result in zip(peers, results, strict=True):
            if isinstance(result, grpc.aio.AioRpcError):
                log.warning("%s of %s on router %s failed: %s", method, request.worker_id,
                            peer.router_id, result.details())
                continue
            if isinstance(result, BaseException):
                raise result
            answered.append(result)
        return answered
