"""The gateway's side of the router: one aio channel, the caller's token on each call.

The channel carries no token of its own: a Generate call carries the HTTP caller's
bearer token (or none, and the router decides), so a caller can never borrow the
gateway's own token, which goes only on ListWorkers (/v1/models, /health).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from protos.slotmesh.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.client.clients import RpcError
from services.rpc import plumbing as rpc
from services.rpc.convert import chunk_from_pb
from services.security.auth import bearer
from services.security.tls import ChannelTls
from worker.vocab.streams import TokenChunk


@dataclass(frozen=True, slots=True, kw_only=True)
class ServedModel:
    """What /v1/models lists: a model some routable worker serves."""

    name: str
    max_model_len: int
    num_workers: int


class RouterStream:
    """One Generate call whose first chunk has arrived (so a refusal was raised before
    any HTTP answer started). Iterating yields that chunk, then the rest; `cancel()`
    ends the call, which aborts the sequence on its worker."""

    def __init__(self, call, first: TokenChunk) -> None:
        self._call = call
        self.first = first

    async def chunks(self) -> AsyncIterator[TokenChunk]:
        yield self.first
        try:
            while True:
                msg = await self._call.read()
                if msg is grpc.aio.EOF:
                    return
                yield chunk_from_pb(msg)
        except grpc.aio.AioRpcError as e:
            raise RpcError.wrap(e) from e

    def cancel(self) -> None:
        self._call.cancel()


class Upstream:
    def __init__(self, address: str, *, tls: ChannelTls | None, token: str | None,
                 timeout_s: float | None) -> None:
        self.address = address
        self._token = token
        self._timeout_s = timeout_s
        self._channel = rpc.channel(address, tls=tls)
        self._stub = router_pb2_grpc.RouterStub(self._channel)

    async def open(self, message: common_pb2.GenerateRequest,
                   token: str | None) -> RouterStream:
        """Start a Generate call and wait for its first chunk; RpcError on refusal."""
        call = self._stub.Generate(message, timeout=self._timeout_s, metadata=bearer(token))
        try:
            msg = await call.read()
        except grpc.aio.AioRpcError as e:
            raise RpcError.wrap(e) from e
        except BaseException:
            call.cancel()
            raise
        if msg is grpc.aio.EOF:  # a router always sends a chunk; be explicit anyway
            raise RpcError(grpc.StatusCode.INTERNAL, "the router ended the stream at once")
        return RouterStream(call, chunk_from_pb(msg))

    async def served_models(self) -> list[ServedModel]:
        """The models of the routable workers, with the smallest context among each
        model's workers (a request must fit whichever worker takes it)."""
        try:
            resp = await self._stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=10,
                                                metadata=bearer(self._token))
        except grpc.aio.AioRpcError as e:
            raise RpcError.wrap(e) from e
        models: dict[str, list[int]] = {}
        for w in resp.workers:
            if not w.draining:
                models.setdefault(w.model, []).append(w.max_model_len)
        return [ServedModel(name=name, max_model_len=min(lens), num_workers=len(lens))
                for name, lens in sorted(models.items())]

    async def close(self) -> None:
        await self._channel.close()
