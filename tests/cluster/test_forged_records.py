"""Redis is not a trust anchor: worker records planted by someone who can write to Redis
(but has no cluster key) get no client request and no cluster credential.

A real router and worker with a cluster key, a real redis-server, and a fake worker: a
grpc.aio server implementing slotmesh.v1.Worker that answers with forged text and
records every call it receives with its metadata. Records pointing at it are planted the
ways an attacker could (unsigned, signed with another key, a genuine record with the
address changed, a genuine record copied under another key), each made the router's
first choice if it were trusted (lowest id, no load, all KV free). The router must route
every request to the real worker, count each planted record on /metrics and log it once.
The control at the end signs the same record with the cluster key: then the fake does
get the request and the credential, so the refusals above are the MACs' doing.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import grpc
import pytest
import redis

from protos.slotmesh.v1 import common_pb2, worker_pb2_grpc
from services.client.clients import Client
from services.local.cluster import write_key_file
from services.metadata import keys
from services.metadata.records import WorkerRecord, from_dict
from services.metadata.signing import sign
from services.security.cluster_auth import CREDENTIAL_METADATA
from tests.cluster_harness import metric_value, scrape, tiny_cluster, wait_until
from worker.vocab.integrity import load_key

pytestmark = pytest.mark.cluster  # real Redis and/or server processes

UNVERIFIED = "slotmesh_router_unverified_records_total"
FORGED_TEXT = "FORGED BY THE FAKE WORKER"
OTHER_KEY = bytes(range(100, 132))
HOUR_MS = 3_600_000


class _Recorder(grpc.aio.ServerInterceptor):
    """Records (method, metadata) of every call, whatever the method."""

    def __init__(self, calls: list) -> None:
        self.calls = calls

    async def intercept_service(self, continuation, handler_call_details):
        self.calls.append((handler_call_details.method,
                           dict(handler_call_details.invocation_metadata or ())))
        return await continuation(handler_call_details)


class _ForgedWorker(worker_pb2_grpc.WorkerServicer):
    async def Generate(self, request, context):
        yield common_pb2.GenerateResponse(
            request_id=request.request_id, token_ids=[1], text=FORGED_TEXT,
            finish_reason=common_pb2.FINISH_REASON_STOP, worker_id="fake",
            num_prompt_tokens=1)


class FakeWorker:
    """A grpc.aio Worker server on loopback, in its own thread and event loop."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.address = ""

    def __enter__(self) -> FakeWorker:
        self._thread.start()
        self.address = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    async def _start(self) -> str:
        self._server = grpc.aio.server(interceptors=[_Recorder(self.calls)])
        worker_pb2_grpc.add_WorkerServicer_to_server(_ForgedWorker(), self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return f"127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._server.stop(None), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, redis_server, tmp_path_factory):
    logs = tmp_path_factory.mktemp("forged-logs")
    key_file = write_key_file(logs / "cluster.key")
    with tiny_cluster(tiny_model_dir("llama"), redis_server.url, logs, num_workers=1,
                      cluster_key_file=key_file) as c:
        yield c


def _plant(rdb, values: dict[str, str]) -> None:
    """Worker records under their ids, no expiry, in one transaction (a registry poll
    sees all of them or none)."""
    pipe = rdb.pipeline(transaction=True)
    for worker_id, value in values.items():
        pipe.set(keys.worker(worker_id), value)
        pipe.sadd(keys.WORKERS, worker_id)
    pipe.execute()


def _remove(rdb, worker_ids) -> None:
    pipe = rdb.pipeline(transaction=True)
    for worker_id in worker_ids:
        pipe.delete(keys.worker(worker_id))
        pipe.srem(keys.WORKERS, worker_id)
    pipe.execute()


def _unverified(cluster) -> float:
    return metric_value(scrape(cluster.router.metrics_address), UNVERIFIED)


def _forgeries(genuine_raw: bytes, fake_address: str) -> dict[str, str]:
    """Records that would make the fake the router's first choice, forged without the
    cluster key."""
    genuine = json.loads(genuine_raw)

    def fields(worker_id: str) -> dict:
        return {**genuine, "worker_id": worker_id, "address": fake_address, "slots": 64,
                "num_running": 0, "num_waiting": 0,
                "kv_blocks_free": genuine["kv_blocks_total"]}

    unsigned = {k: v for k, v in fields("a-unsigned").items()
                if k not in ("mac", "expires_ms")}
    other_key = from_dict(WorkerRecord, fields("a-other-key"))
    return {
        "a-unsigned": json.dumps(unsigned),
        "a-other-key": sign(other_key, key=OTHER_KEY, redis_key=keys.worker("a-other-key"),
                            expires_ms=int(time.time() * 1000) + HOUR_MS),
        # the genuine MAC kept, the address changed: the attack on a real worker's entry
        "a-readdressed": json.dumps(fields("a-readdressed") | {"mac": genuine["mac"]}),
        # a genuine record as it is, under another id (it points at the real worker)
        "a-copied": genuine_raw.decode(),
    }


def test_forged_worker_records_get_no_request_and_no_credential(cluster,
                                                                redis_server) -> None:
    with redis.Redis.from_url(redis_server.url) as rdb:
        _forged_records_get_nothing(cluster, rdb)


def _forged_records_get_nothing(cluster, rdb) -> None:
    genuine_raw = rdb.get(keys.worker("worker-0"))
    assert "mac" in json.loads(genuine_raw)  # the real worker signs its record
    with FakeWorker() as fake, Client(cluster.router_address, timeout=60) as client:
        forged = _forgeries(genuine_raw, fake.address)
        before = _unverified(cluster)
        _plant(rdb, forged)
        try:
            # two polls that saw every planted record (counted once each per poll)
            wait_until(lambda: _unverified(cluster) >= before + 2 * len(forged), 30,
                       "the router counting the planted records twice")
            assert [w.worker_id for w in client.list_workers()] == ["worker-0"]
            for i in range(6):
                out = client.generate(text=f"Prompt {i} for whoever serves it", max_tokens=4,
                                      temperature=0, ignore_eos=True)
                assert out.worker_id == "worker-0" and FORGED_TEXT not in out.text
            assert fake.calls == []
            log = (cluster.log_dir / "router.log").read_text()
            for worker_id in forged:
                assert log.count(f"'{keys.worker(worker_id)}'") == 1, worker_id
        finally:
            _remove(rdb, forged)

        _control_a_signed_record_is_trusted(cluster, rdb, client, fake, genuine_raw)


def _control_a_signed_record_is_trusted(cluster, rdb, client, fake, genuine_raw) -> None:
    """The same forged record signed with the cluster key (what only a key holder can
    do) is routed to first: the fake then gets the request and the credential."""
    fields = json.loads(_forgeries(genuine_raw, fake.address)["a-unsigned"])
    record = from_dict(WorkerRecord, fields | {"worker_id": "a-signed"})
    _plant(rdb, {"a-signed": sign(record, key=load_key(cluster.cluster_key_file),
                                  redis_key=keys.worker("a-signed"),
                                  expires_ms=int(time.time() * 1000) + HOUR_MS)})
    try:
        wait_until(lambda: "a-signed" in {w.worker_id for w in client.list_workers()}, 30,
                   "the router listing the signed record")
        out = client.generate(text="Prompt for the signed record", max_tokens=4,
                              temperature=0)
        assert out.text == FORGED_TEXT
        [(method, metadata)] = fake.calls
        assert method == "/slotmesh.v1.Worker/Generate"
        assert metadata.get(CREDENTIAL_METADATA)
    finally:
        _remove(rdb, ["a-signed"])
