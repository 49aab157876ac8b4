"""The router's write-behind metadata writer against a real redis-server: the latest state
per key wins, a delete is final, records carry their lease, the pending count covers the
batch in flight, and a flush cancelled mid-write (shutdown) keeps its batch."""

from __future__ import annotations

import asyncio

import pytest
import redis

from services.metadata import keys
from services.metadata.records import SequenceRecord
from services.metadata.store import RedisStore
from services.metadata.writer import MetadataWriter

pytestmark = pytest.mark.cluster  # a real redis-server


def record(request_id: str, tokens: int = 0) -> SequenceRecord:
    return SequenceRecord(request_id=request_id, worker_id="w", router_id="r",
                          status="running", prompt_hash="h", num_tokens_emitted=tokens,
                          params={}, updated_ms=0, seed=1)


class HeldStore(RedisStore):
    """The real store, whose batch writes wait until the test lets them through."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def write_batch(self, *args) -> None:
        self.entered.set()
        await self.release.wait()
        await super().write_batch(*args)


def test_latest_state_wins_and_delete_is_final(redis_server) -> None:
    async def main() -> None:
        store = await RedisStore.connect(redis_server.url)
        writer = MetadataWriter(store, sequence_ttl_s=30.0)
        writer.put(record("kept", 1))
        writer.put(record("kept", 2))
        writer.put(record("gone"))
        writer.delete("gone")
        assert writer.num_pending == 2
        assert await writer.flush()
        assert writer.num_pending == 0
        kept = await store.get_sequence("kept")
        assert kept is not None and kept.num_tokens_emitted == 2
        assert await store.get_sequence("gone") is None
        await store.close()

    asyncio.run(main())
    with redis.Redis.from_url(redis_server.url) as rdb:
        assert 0 < rdb.pttl(keys.sequence("kept")) <= 30_000  # the lease
        rdb.delete(keys.sequence("kept"))


def test_a_flush_cancelled_mid_write_is_flushed_again_on_close(redis_server) -> None:
    async def main() -> None:
        store = HeldStore(redis_server.url)
        writer = MetadataWriter(store)
        check = await RedisStore.connect(redis_server.url)
        await check.write_batch([record("ending")], [], {}, 30.0, 30.0)  # a live record
        await writer.start()
        writer.delete("ending")  # its stream ended: the delete is being written ...
        await store.entered.wait()
        assert writer.num_pending == 1  # ... in flight: not flushed yet
        store.release.set()  # the write could go on, but the task has not run since:
        await writer.close()  # close() cancels it mid-write, then flushes once more
        assert writer.num_pending == 0
        assert await check.get_sequence("ending") is None
        await check.close()
        await store.close()

    asyncio.run(main())
