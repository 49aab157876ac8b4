"""Every reader of the worker and router registries verifies what it reads (a real
redis-server): RedisStore signs the records it registers with its cluster key and lists
only the records that verify under it, counting and logging (once per key) the others."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import redis

from services.metadata import keys
from services.metadata.records import RouterRecord, WorkerRecord
from services.metadata.store import RedisStore, now_ms

pytestmark = pytest.mark.cluster  # real Redis

KEY = bytes(range(32))
OTHER_KEY = bytes(range(5, 37))


def worker_record(worker_id: str, address: str = "127.0.0.1:50061") -> WorkerRecord:
    return WorkerRecord(
        worker_id=worker_id, address=address, model="tiny", fingerprint="f" * 16,
        architecture="LlamaForCausalLM", dtype="float32", device="cpu", max_model_len=2048,
        slots=4, block_size=16, attention_backend="sdpa", version="0.1", num_running=0,
        num_waiting=0, kv_blocks_free=64, kv_blocks_total=64, heartbeat_ms=now_ms(),
        draining=False, instance_id="i0", weights="float32 x18")


@pytest.fixture
def rdb(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def run(redis_url: str, key: bytes | None, op):
    """op(store) on a store with `key`; returns (result, the store's unverified counts)."""
    async def main():
        store = await RedisStore.connect(redis_url, cluster_key=key)
        try:
            return await op(store), dict(store.num_unverified)
        finally:
            await store.close()

    return asyncio.run(main())


def test_records_written_with_the_key_verify_only_under_it(redis_server, rdb) -> None:
    url = redis_server.url
    run(url, KEY, lambda s: s.register_worker(worker_record("w1"), ttl_s=60))
    run(url, KEY, lambda s: s.register_router(
        RouterRecord(router_id="r1", address="127.0.0.1:50051", heartbeat_ms=now_ms()),
        ttl_s=60))
    stored = json.loads(rdb.get(keys.worker("w1")))
    assert stored["mac"] and stored["expires_ms"] > now_ms()

    workers, counts = run(url, KEY, lambda s: s.list_workers())
    assert [r.worker_id for r in workers] == ["w1"] and counts == {}
    assert [r.router_id for r in run(url, KEY, lambda s: s.list_routers())[0]] == ["r1"]
    assert run(url, OTHER_KEY, lambda s: s.list_workers()) == ([], {"worker": 1})
    assert run(url, OTHER_KEY, lambda s: s.list_routers()) == ([], {"router": 1})
    assert run(url, None, lambda s: s.list_workers()) == ([], {"worker": 1})


def test_a_keyless_cluster_trusts_unsigned_records_and_a_keyed_one_does_not(
        redis_server, rdb) -> None:
    url = redis_server.url
    run(url, None, lambda s: s.register_worker(worker_record("plain"), ttl_s=60))
    assert "mac" not in json.loads(rdb.get(keys.worker("plain")))
    [record], counts = run(url, None, lambda s: s.list_workers())
    assert record.worker_id == "plain" and counts == {}
    assert run(url, KEY, lambda s: s.list_workers()) == ([], {"worker": 1})


def test_planted_records_are_skipped_counted_and_logged_once(redis_server, rdb,
                                                             caplog) -> None:
    url = redis_server.url
    run(url, KEY, lambda s: s.register_router(
        RouterRecord(router_id="real", address="127.0.0.1:50051", heartbeat_ms=now_ms()),
        ttl_s=60))
    planted = {"evil": json.dumps({"router_id": "evil", "address": "127.0.0.1:1",
                                   "heartbeat_ms": now_ms()}),
               "junk": "not json at all"}
    for router_id, value in planted.items():
        rdb.set(keys.router(router_id), value)
        rdb.sadd(keys.ROUTERS, router_id)

    async def list_three_times(store):
        return [[r.router_id for r in await store.list_routers()] for _ in range(3)]

    with caplog.at_level(logging.WARNING, logger="services.metadata.store"):
        listings, counts = run(url, KEY, list_three_times)
    assert listings == [["real"]] * 3
    assert counts == {"router": 6}
    for router_id in planted:
        lines = [r for r in caplog.records if repr(keys.router(router_id)) in r.getMessage()]
        assert len(lines) == 1, router_id
