"""The Redis store: the only module that imports `redis`.

Every method is one round trip (a pipeline where it writes several keys) with short
timeouts and no hidden retries: callers decide what an outage means (the router keeps
its cached registry, the writer keeps its pending writes). Any Redis or socket failure
surfaces as StoreUnavailableError.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from services.metadata import keys
from services.metadata.records import (
    CorruptRecordError,
    SequenceRecord,
    WorkerRecord,
    decode,
    encode,
)
from worker.errors import UnavailableError

log = logging.getLogger(__name__)
T = TypeVar("T")


class StoreUnavailableError(UnavailableError):
    """Redis did not answer (down, unreachable, timed out)."""


def now_ms() -> int:
    return int(time.time() * 1000)


class RedisStore:
    def __init__(self, url: str, *, timeout_s: float = 1.0) -> None:
        self.url = url
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0), retry_on_timeout=False, health_check_interval=0)

    @classmethod
    async def connect(cls, url: str, *, timeout_s: float = 1.0) -> RedisStore:
        """Open and ping; a store that cannot be reached now is a startup error."""
        store = cls(url, timeout_s=timeout_s)
        try:
            await store.ping()
        except StoreUnavailableError:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        await self._redis.aclose()

    async def _call(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        try:
            return await op()
        except (RedisError, OSError) as e:
            raise StoreUnavailableError(f"Redis at {self.url} unavailable ({what}): "
                                        f"{type(e).__name__}: {e}") from e

    async def ping(self) -> None:
        await self._call("ping", self._redis.ping)

    # -- worker registry -----------------------------------------------------------------

    async def register_worker(self, record: WorkerRecord, ttl_s: float) -> None:
        """Write (or renew) a worker's record with an expiry; every heartbeat calls this,
        so the registry rebuilds itself after Redis restarts empty."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(keys.worker(record.worker_id), encode(record), px=int(ttl_s * 1000))
        pipe.sadd(keys.WORKERS, record.worker_id)
        await self._call("register worker", pipe.execute)

    async def deregister_worker(self, worker_id: str) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(keys.worker(worker_id))
        pipe.srem(keys.WORKERS, worker_id)
        await self._call("deregister worker", pipe.execute)

    async def list_workers(self) -> list[WorkerRecord]:
        """Live workers (key not expired), by id. Ids whose key expired are pruned."""
        ids = sorted(m.decode() for m in await self._call(
            "list workers", lambda: self._redis.smembers(keys.WORKERS)))
        if not ids:
            return []
        raws = await self._call("list workers",
                                lambda: self._redis.mget([keys.worker(i) for i in ids]))
        records, dead = [], []
        for worker_id, raw in zip(ids, raws, strict=True):
            if raw is None:
                dead.append(worker_id)
                continue
            try:
                records.append(decode(WorkerRecord, raw))
            except CorruptRecordError as e:
                log.warning("ignoring worker %r: %s", worker_id, e)
        if dead:
            await self._call("prune workers", lambda: self._redis.srem(keys.WORKERS, *dead))
        return records

    # -- sequences -------------------------------------------------------------------------

    async def write_batch(self, puts: list[SequenceRecord], deletes: list[str],
                          prefixes: dict[str, str], sequence_ttl_s: float,
                          prefix_ttl_s: float) -> None:
        """One pipeline of sequence puts/deletes and prefix-owner writes (the writer's)."""
        pipe = self._redis.pipeline(transaction=False)
        for record in puts:
            pipe.set(keys.sequence(record.request_id), encode(record),
                     px=int(sequence_ttl_s * 1000))
        if deletes:
            pipe.delete(*(keys.sequence(i) for i in deletes))
        for prefix_hash, worker_id in prefixes.items():
            pipe.set(keys.prefix(prefix_hash), worker_id, px=int(prefix_ttl_s * 1000))
        await self._call("write metadata", pipe.execute)

    async def get_sequence(self, request_id: str) -> SequenceRecord | None:
        raw = await self._call("get sequence",
                               lambda: self._redis.get(keys.sequence(request_id)))
        if raw is None:
            return None
        try:
            return decode(SequenceRecord, raw)
        except CorruptRecordError as e:
            log.warning("ignoring sequence %r: %s", request_id, e)
            return None

    # -- prefix affinity -------------------------------------------------------------------

    async def prefix_owners(self, prefix_hashes: list[str]) -> list[str | None]:
        """The worker recorded for each prefix hash (None where there is none)."""
        if not prefix_hashes:
            return []
        raws = await self._call("prefix lookup", lambda: self._redis.mget(
            [keys.prefix(h) for h in prefix_hashes]))
        return [r.decode(errors="replace") if r is not None else None for r in raws]
