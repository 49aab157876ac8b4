"""The Redis store: the only module that imports `redis`.

Every method is one round trip (a pipeline where it writes several keys) with short
timeouts and no hidden retries: callers decide what an outage means (the router keeps
its cached registry, the writer keeps its pending writes). Any Redis or socket failure
surfaces as StoreUnavailableError.
"""

from __future__ import annotations

import collections
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from services.metadata import keys, signing
from services.metadata.records import (
    CorruptRecordError,
    RouterRecord,
    SequenceRecord,
    WorkerRecord,
    decode,
    encode,
)
from worker.vocab.errors import UnavailableError

if TYPE_CHECKING:
    from services.security.tls import RedisTls

log = logging.getLogger(__name__)
T = TypeVar("T")
_MAX_LOGGED_UNVERIFIED = 1000

# Shared by the prompt-cache scripts: KEYS[1..3] are the layout's index, sizes, bytes.
_DROP = """
local index, sizes, total = KEYS[1], KEYS[2], KEYS[3]
local function drop(key)
  local size = redis.call('HGET', sizes, key)
  if size then
    redis.call('DECRBY', total, size)
    redis.call('HDEL', sizes, key)
  end
  redis.call('ZREM', index, key)
  redis.call('DEL', key)
end
"""

# Add one prompt-cache entry atomically, or nothing. KEYS[4 .. 3+nrefs]: entries it uses
# that must exist (refreshed); the rest: entries to write, ARGV[5 ..] their values.
# ARGV[1..4]: now (ms), ttl (ms), budget (bytes), nrefs. Expired entries leave the books
# first; then the oldest entries are evicted until the new bytes fit the budget.
_PUT = _DROP + """
local now, ttl, budget, nrefs = tonumber(ARGV[1]), tonumber(ARGV[2]),
                                tonumber(ARGV[3]), tonumber(ARGV[4])
for _, key in ipairs(redis.call('ZRANGEBYSCORE', index, '-inf', now)) do drop(key) end
local missing = {}
for i = 4, 3 + nrefs do
  if redis.call('EXISTS', KEYS[i]) == 0 then missing[#missing + 1] = KEYS[i] end
end
if #missing > 0 then return {'missing', missing} end
local add = 0
for i = 4 + nrefs, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then add = add + #ARGV[i - nrefs + 1] end
end
if add > budget then return {'too_big', tostring(add)} end
local expiry = now + ttl
for i = 4, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('PEXPIRE', KEYS[i], ttl)
    redis.call('ZADD', index, expiry, KEYS[i])
  end
end
local used = tonumber(redis.call('GET', total) or '0')
while used + add > budget do
  local oldest = redis.call('ZRANGE', index, 0, 0, 'WITHSCORES')
  if #oldest == 0 or tonumber(oldest[2]) >= expiry then return {'too_big', tostring(add)} end
  drop(oldest[1])
  used = tonumber(redis.call('GET', total) or '0')
end
for i = 4 + nrefs, #KEYS do
  local key, value = KEYS[i], ARGV[i - nrefs + 1]
  if redis.call('EXISTS', key) == 0 then
    redis.call('SET', key, value, 'PX', ttl)
    redis.call('HSET', sizes, key, #value)
    redis.call('INCRBY', total, #value)
    redis.call('ZADD', index, expiry, key)
  end
end
return {'ok', tostring(used + add)}
"""

_DELETE = _DROP + """
for i = 4, #KEYS do drop(KEYS[i]) end
return tostring(redis.call('GET', total) or '0')
"""


class StoreUnavailableError(UnavailableError):
    """Redis did not answer (down, unreachable, timed out)."""


def now_ms() -> int:
    return int(time.time() * 1000)


def redact_url(url: str) -> str:
    """The URL with its password (redis://:PASSWORD@host) masked, for logs and errors."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class RedisStore:
    """`url`: redis:// or rediss:// (TLS), with an optional user and password (Redis
    ACLs) that never reach a log line; `tls`: the CA and client certificate of a
    rediss:// URL (services/security/tls.py); `cluster_key`: worker and router records
    are signed with it and read only when they verify (services/metadata/signing.py).

    num_unverified counts, by kind ("worker", "router"), the records a listing skipped
    because they did not verify; each such Redis key is logged once per reason.
    """

    def __init__(self, url: str, *, timeout_s: float = 1.0, tls: RedisTls | None = None,
                 cluster_key: bytes | None = None) -> None:
        self.url = redact_url(url)  # the password never reaches a log line
        self._cluster_key = cluster_key
        self.num_unverified: collections.Counter[str] = collections.Counter()
        self._logged_unverified: set[tuple[str, str]] = set()
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0), retry_on_timeout=False, health_check_interval=0,
            **(tls.connection_kwargs() if tls is not None else {}))
        self._put = self._redis.register_script(_PUT)
        self._delete = self._redis.register_script(_DELETE)

    @classmethod
    async def connect(cls, url: str, *, timeout_s: float = 1.0, tls: RedisTls | None = None,
                      cluster_key: bytes | None = None) -> RedisStore:
        """Open and ping; a store that cannot be reached now is a startup error."""
        store = cls(url, timeout_s=timeout_s, tls=tls, cluster_key=cluster_key)
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
        await self._register(keys.WORKERS, keys.worker(record.worker_id), record.worker_id,
                             record, ttl_s)

    async def deregister_worker(self, worker_id: str) -> None:
        await self._deregister(keys.WORKERS, keys.worker(worker_id), worker_id)

    async def _register(self, members: str, key: str, member_id: str,
                        record: WorkerRecord | RouterRecord, ttl_s: float) -> None:
        """One registry entry: its expiring key (the record, signed under the cluster
        key) and its id in the members set."""
        ttl_ms = int(ttl_s * 1000)
        value = signing.sign(record, key=self._cluster_key, redis_key=key,
                             expires_ms=now_ms() + ttl_ms)
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(key, value, px=ttl_ms)
        pipe.sadd(members, member_id)
        await self._call(f"register {member_id}", pipe.execute)

    async def _deregister(self, members: str, key: str, member_id: str) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(key)
        pipe.srem(members, member_id)
        await self._call(f"deregister {member_id}", pipe.execute)

    async def list_workers(self) -> list[WorkerRecord]:
        """Live workers (key not expired), by id. Ids whose key expired are pruned."""
        return await self._list_live(WorkerRecord, "worker", keys.WORKERS, keys.worker)

    async def _list_live(self, cls: type[T], kind: str, members: str,
                         key: Callable[[str], str]) -> list[T]:
        """The records of a registry set whose keys have not expired and that verify;
        prunes the ids of expired keys."""
        what = f"list {cls.__name__}s"
        ids = sorted(m.decode() for m in await self._call(
            what, lambda: self._redis.smembers(members)))
        if not ids:
            return []
        raws = await self._call(what, lambda: self._redis.mget([key(i) for i in ids]))
        records, dead = [], []
        for member_id, raw in zip(ids, raws, strict=True):
            if raw is None:
                dead.append(member_id)
                continue
            try:
                records.append(signing.verify(cls, raw, key=self._cluster_key,
                                              redis_key=key(member_id), now_ms=now_ms()))
            except signing.UnverifiedRecordError as e:
                self._unverified(kind, key(member_id), e.reason)
            except CorruptRecordError as e:
                log.warning("ignoring %s %r: %s", cls.__name__, member_id, e)
        if dead:
            await self._call(f"prune {what}", lambda: self._redis.srem(members, *dead))
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

    async def list_sequence_ids(self) -> list[str]:
        """Every sequence with a record (SCAN, not KEYS: safe on a busy Redis)."""
        prefix = keys.sequence("")

        async def op() -> list[str]:
            return [k.decode().removeprefix(prefix)
                    async for k in self._redis.scan_iter(match=prefix + "*", count=1000)]

        return await self._call("list sequences", op)

    # -- prefix affinity -------------------------------------------------------------------

    async def prefix_owners(self, prefix_hashes: list[str]) -> list[str | None]:
        """The worker recorded for each prefix hash (None where there is none)."""
        if not prefix_hashes:
            return []
        raws = await self._call("prefix lookup", lambda: self._redis.mget(
            [keys.prefix(h) for h in prefix_hashes]))
        return [r.decode(errors="replace") if r is not None else None for r in raws]

    # -- router registry (routers find each other to forward Migrate / Drain) -------------

    async def register_router(self, record: RouterRecord, ttl_s: float) -> None:
        await self._register(keys.ROUTERS, keys.router(record.router_id), record.router_id,
                             record, ttl_s)

    async def deregister_router(self, router_id: str) -> None:
        await self._deregister(keys.ROUTERS, keys.router(router_id), router_id)

    async def list_routers(self) -> list[RouterRecord]:
        """Live routers (key not expired), by id."""
        return await self._list_live(RouterRecord, "router", keys.ROUTERS, keys.router)

    def _unverified(self, kind: str, redis_key: str, reason: str) -> None:
        """Count a record that did not verify; log it once per key and reason (a planted
        record is seen on every poll)."""
        self.num_unverified[kind] += 1
        if (redis_key, reason) in self._logged_unverified:
            return
        if len(self._logged_unverified) >= _MAX_LOGGED_UNVERIFIED:
            self._logged_unverified.clear()  # bounded, whatever is written into Redis
        self._logged_unverified.add((redis_key, reason))
        log.warning("ignoring %s record %r: %s (Redis is not trusted: only records that "
                    "verify under the cluster key are used)", kind, redis_key[:200], reason)

    # -- the cluster-wide prompt cache -----------------------------------------------------

    async def put_prompt_cache(self, layout_id: str, refs: list[str],
                               entries: list[tuple[str, bytes]], *, ttl_s: float,
                               max_bytes: int) -> PutResult:
        """Write entries (all or none) that need the entries `refs` to exist, within the
        layout's byte budget (the oldest entries are evicted to make room)."""
        books = keys.prompt_cache_books(layout_id)
        reply = await self._call("prompt cache put", lambda: self._put(
            keys=[*books, *refs, *(k for k, _ in entries)],
            args=[now_ms(), int(ttl_s * 1000), max_bytes, len(refs),
                  *(v for _, v in entries)]))
        status = reply[0].decode()
        if status == "missing":
            return PutResult(status, missing=[k.decode() for k in reply[1]])
        return PutResult(status, num_bytes=int(reply[1]))

    async def delete_prompt_cache(self, layout_id: str, entry_keys: list[str]) -> int:
        """Remove entries and their sizes from the books; returns the bytes left."""
        books = keys.prompt_cache_books(layout_id)
        return int(await self._call("prompt cache delete", lambda: self._delete(
            keys=[*books, *entry_keys], args=[])))

    async def exists_many(self, entry_keys: list[str]) -> list[bool]:
        async def op() -> list[bool]:
            pipe = self._redis.pipeline(transaction=False)
            for key in entry_keys:
                pipe.exists(key)
            return [bool(n) for n in await pipe.execute()]

        return await self._call("prompt cache lookup", op) if entry_keys else []

    async def get_many(self, entry_keys: list[str]) -> list[bytes | None]:
        if not entry_keys:
            return []
        return await self._call("prompt cache fetch", lambda: self._redis.mget(entry_keys))

    async def prompt_cache_bytes(self, layout_id: str) -> int:
        raw = await self._call("prompt cache size", lambda: self._redis.get(
            keys.prompt_cache_books(layout_id)[2]))
        return int(raw or 0)


@dataclass(frozen=True, slots=True)
class PutResult:
    """ok (num_bytes: the layout's bytes now), too_big (num_bytes: the entry's new
    bytes, more than the budget can hold), or missing (refs that no longer exist)."""

    status: str
    num_bytes: int = 0
    missing: list[str] = field(default_factory=list)
