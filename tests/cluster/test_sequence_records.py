"""No sequence record outlives its sequence: each way a stream can end, through a real
router, workers and redis-server, leaves no `slotmesh:seq:*` key once the routers have
flushed their write-behind metadata; a router that dies leaves its records for at most
their lease (`--sequence-ttl`), after which Redis expires them.

Workers are paced (every step >= MIN_STEP_MS), so a MAX_TOKENS stream is still running
when the test ends it, on a machine of any speed.
"""

from __future__ import annotations

import grpc
import pytest
import redis

from services.client import Client, RpcError
from services.metadata import keys
from tests.cluster_harness import (
    metric_value,
    scrape,
    sequence_keys,
    tiny_cluster,
    wait_metadata_flushed,
    wait_until,
)

pytestmark = pytest.mark.cluster  # a real redis-server

MIN_STEP_MS = 10
MAX_TOKENS = 300  # >= 3 s per stream
LEASE_S = 3.0  # the routers' --sequence-ttl here


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, redis_server, tmp_path_factory):
    with tiny_cluster(tiny_model_dir("llama"), redis_server.url,
                      tmp_path_factory.mktemp("records-logs"), num_workers=3,
                      heartbeat_ttl_s=2.0, min_step_ms=MIN_STEP_MS,
                      router_args=("--sequence-ttl", str(LEASE_S))) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster.router_address, timeout=120) as c:
        yield c


@pytest.fixture
def rdb(redis_server):
    with redis.Redis.from_url(redis_server.url) as r:
        yield r


def has_record(rdb, request_id: str) -> bool:
    return rdb.exists(keys.sequence(request_id)) == 1


def long_stream(client: Client, request_id: str):
    return client.stream(text="a long story", request_id=request_id, max_tokens=MAX_TOKENS,
                         temperature=0.0, ignore_eos=True)


def started(client: Client, rdb, request_id: str):
    """A running stream whose record is in Redis; returns (stream, first chunk)."""
    stream = long_stream(client, request_id)
    first = next(stream)
    wait_until(lambda: has_record(rdb, request_id), 10, f"{request_id}'s record in Redis")
    return stream, first


def assert_no_records_left(cluster, redis_url: str) -> None:
    wait_metadata_flushed(cluster)
    assert sequence_keys(redis_url) == []


def live_routable(cluster, client: Client) -> set[str]:
    live = {w.name for w in cluster.workers if w.proc.poll() is None}
    return live & {w.worker_id for w in client.list_workers()}


# -- each way a stream ends -----------------------------------------------------------------

def end_normally(cluster, client, rdb) -> None:
    stream, first = started(client, rdb, "end-normal")
    assert [first, *stream][-1].finish_reason == "length"


def end_by_abort(cluster, client, rdb) -> None:
    stream, _ = started(client, rdb, "end-abort")
    assert client.abort("end-abort")
    assert list(stream)[-1].finish_reason == "abort"


def end_by_client_cancel(cluster, client, rdb) -> None:
    stream, _ = started(client, rdb, "end-cancel")
    stream.close()  # the client goes away mid-stream
    wait_until(lambda: metric_value(scrape(cluster.router.metrics_address),
                                    "slotmesh_router_running_streams") == 0, 30,
               "the router to let the cancelled stream go")


def end_by_deadline(cluster, client, rdb) -> None:
    with Client(cluster.router_address, timeout=1.0) as hasty, \
            pytest.raises(RpcError) as e:
        list(long_stream(hasty, "end-deadline"))  # >= 3 s of steps: past the deadline
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: metric_value(scrape(cluster.router.metrics_address),
                                    "slotmesh_router_running_streams") == 0, 30,
               "the router to let the expired stream go")


def end_by_refusal(cluster, client, rdb) -> None:
    # the router routes it (ids are checked against the vocabulary on the worker), the
    # worker refuses it: the record written when routing must go
    with pytest.raises(RpcError) as e:
        client.generate(token_ids=[10**6], request_id="end-refused-worker", max_tokens=4)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(RpcError) as e:  # refused by the router itself
        client.generate(text="x", request_id="end-refused-router", temperature=-1.0)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def end_after_failover(cluster, client, rdb) -> None:
    stream, first = started(client, rdb, "end-failover")
    next(w for w in cluster.workers if w.name == first.worker_id).kill()
    chunks = [first, *stream]
    assert chunks[-1].finish_reason == "length"
    assert sum(len(c.token_ids) for c in chunks) == MAX_TOKENS
    assert [c.worker_id for c in chunks if c.worker_id][-1] != first.worker_id
    cluster.add_worker()  # back to three live workers


def end_after_migration(cluster, client, rdb) -> None:
    wait_until(lambda: len(live_routable(cluster, client)) >= 2, 30, "two routable workers")
    stream, first = started(client, rdb, "end-migrated")
    moved = client.migrate("end-migrated")
    assert moved.source_worker_id == first.worker_id
    chunks = [first, *stream]
    assert chunks[-1].finish_reason == "length"
    assert sum(len(c.token_ids) for c in chunks) == MAX_TOKENS


WAYS = {"normal end": end_normally, "abort": end_by_abort,
        "client cancel": end_by_client_cancel, "deadline": end_by_deadline,
        "refusal": end_by_refusal, "failover": end_after_failover,
        "migration": end_after_migration}


@pytest.mark.parametrize("way", list(WAYS))
def test_no_record_outlives_its_sequence(cluster, client, rdb, redis_server, way) -> None:
    WAYS[way](cluster, client, rdb)
    assert_no_records_left(cluster, redis_server.url)


def test_a_dead_routers_records_expire_with_their_lease(cluster, rdb,
                                                        redis_server) -> None:
    """A router killed mid-stream cannot delete its records: each is a lease the router
    renewed every LEASE_S / 3, so Redis drops it at most LEASE_S after the kill (until
    then a client resuming on another router can still read the seed from it)."""
    doomed = cluster.add_router()
    with Client(doomed.address, timeout=120) as via_doomed:
        started(via_doomed, rdb, "end-router-death")
        doomed.kill()
        remaining_ms = rdb.pttl(keys.sequence("end-router-death"))
        assert 0 < remaining_ms <= LEASE_S * 1000
        wait_until(lambda: not has_record(rdb, "end-router-death"), LEASE_S + 10,
                   "the dead router's record to expire")
    cluster.routers.remove(doomed)
    assert_no_records_left(cluster, redis_server.url)

