"""Router + 2 workers + a real redis-server, all over loopback, on a tiny random Llama.

One cluster serves the whole module; every test leaves it idle (checked), so the tests
do not depend on each other's order.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis

from services.client.clients import AsyncClient, Client, RpcError
from services.metadata import keys
from tests.cluster_harness import (
    is_idle,
    metric_sample,
    metric_value,
    scrape,
    tiny_cluster,
    wait_metadata_flushed,
    wait_until,
)
from worker.config import EngineConfig, ModelConfig
from worker.engine import LLMEngine
from worker.vocab.sampling_params import SamplingParams

pytestmark = pytest.mark.cluster  # real Redis and/or server processes

PROMPTS = [f"Request number {i}: the quick brown fox jumps over" for i in range(8)]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def cluster(model_dir, redis_server, tmp_path_factory):
    logs = tmp_path_factory.mktemp("cluster-logs")
    # paced steps (>= 10 ms): the 300-480-token streams below are still running when a
    # test looks at, cancels, aborts or times them out, on a machine of any speed
    with tiny_cluster(model_dir, redis_server.url, logs, min_step_ms=10) as c:
        yield c


@pytest.fixture(scope="module")
def rdb(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def leaves_cluster_idle(cluster):
    yield
    for w in cluster.workers:
        wait_until(lambda w=w: is_idle(w.address), 10, f"{w.name} idle with all blocks free")


def reference_outputs(model_dir, prompts, params) -> list[list[int]]:
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=str(model_dir),
                                                      max_model_len=8192), warmup=False))
    ids = [engine.encode_prompt(prompt=p) for p in prompts]
    return [r.token_ids for r in engine.generate(ids, params)]


def test_eight_concurrent_streams_match_in_process_engine(cluster, model_dir) -> None:
    async def run():
        async with AsyncClient(cluster.router_address, timeout=60) as client:
            async def one(i):
                chunks = [c async for c in client.stream(
                    text=PROMPTS[i], request_id=f"eight-{i}", max_tokens=24, temperature=0,
                    ignore_eos=True)]
                return chunks
            return await asyncio.gather(*(one(i) for i in range(8)))

    streams = asyncio.run(run())
    want = reference_outputs(model_dir, PROMPTS, SamplingParams(max_tokens=24, temperature=0,
                                                                ignore_eos=True))
    workers = set()
    for i, chunks in enumerate(streams):
        assert [t for c in chunks for t in c.token_ids] == want[i], f"request {i}"
        assert chunks[-1].finish_reason == "length"
        assert all(c.request_id == f"eight-{i}" for c in chunks)
        workers.add(chunks[0].worker_id)
    assert workers == {"worker-0", "worker-1"}, "8 concurrent requests use both workers"


def test_metadata_in_redis_while_running_and_gone_after(cluster, rdb) -> None:
    with Client(cluster.router_address, timeout=30) as client:
        stream = client.stream(text="hello there", request_id="meta-1", max_tokens=400,
                               temperature=0, ignore_eos=True)
        first = next(stream)
        info = wait_for_tokens(client, "meta-1", 2)
        assert info.worker_id == first.worker_id and info.status == "running"
        assert info.params.max_tokens == 400 and info.params.ignore_eos
        assert info.prompt_hash and info.router_id.startswith("router-")
        wait_until(lambda: rdb.get(keys.sequence("meta-1")) is not None, 5, "seq key in Redis")
        assert b'"worker_id":"' + first.worker_id.encode() in rdb.get(keys.sequence("meta-1"))
        rest = list(stream)
    assert rest[-1].finish_reason == "length"
    wait_until(lambda: rdb.get(keys.sequence("meta-1")) is None, 5, "seq key removed")
    with Client(cluster.router_address, timeout=5) as client, \
            pytest.raises(RpcError) as e:
        client.get_sequence("meta-1")
    assert e.value.code == grpc.StatusCode.NOT_FOUND


def wait_for_tokens(client: Client, request_id: str, n: int):
    seen = {}

    def has_tokens() -> bool:
        seen["info"] = client.get_sequence(request_id)
        return seen["info"].num_tokens_emitted >= n

    wait_until(has_tokens, 10, f"{request_id} to emit {n} tokens")
    return seen["info"]


def test_client_cancel_frees_blocks_and_metadata(cluster, rdb) -> None:
    cancelled_before = num_cancelled(cluster)
    with Client(cluster.router_address, timeout=30) as client:
        stream = client.stream(text="cancel me", request_id="cancel-1", max_tokens=480,
                               temperature=0, ignore_eos=True)
        chunks = [next(stream) for _ in range(3)]
        owner = next(w for w in cluster.workers if w.name == chunks[0].worker_id)
        assert not is_idle(owner.address)
        stream.close()  # the client goes away mid-stream
    wait_until(lambda: is_idle(owner.address), 10, "blocks back on the worker")
    wait_until(lambda: rdb.get(keys.sequence("cancel-1")) is None, 5, "metadata gone")
    assert num_cancelled(cluster) == cancelled_before + 1


def num_cancelled(cluster) -> float:
    name = 'slotmesh_worker_requests_total{finish_reason="cancelled"}'
    return sum(metric_value(scrape(w.metrics_address), name) for w in cluster.workers)


def test_deadline_propagates_to_worker(cluster) -> None:
    with Client(cluster.router_address, timeout=0.3) as client, \
            pytest.raises(RpcError) as e:
        list(client.stream(text="slow", max_tokens=480, temperature=0, ignore_eos=True))
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    # the autouse fixture checks the worker freed the sequence


def test_abort_by_id_and_not_found(cluster) -> None:
    with Client(cluster.router_address, timeout=30) as client:
        stream = client.stream(text="abort me", request_id="abort-1", max_tokens=480,
                               temperature=0, ignore_eos=True)
        next(stream)
        assert client.abort("abort-1") is True
        rest = list(stream)
        assert rest[-1].finish_reason == "abort"
        for call in (lambda: client.abort("nope"), lambda: client.get_sequence("nope")):
            with pytest.raises(RpcError) as e:
                call()
            assert e.value.code == grpc.StatusCode.NOT_FOUND and "nope" in e.value.message


def test_duplicate_running_request_id_is_rejected(cluster) -> None:
    with Client(cluster.router_address, timeout=30) as client:
        stream = client.stream(text="dup", request_id="dup-1", max_tokens=300,
                               temperature=0, ignore_eos=True)
        next(stream)
        with pytest.raises(RpcError) as e:
            client.generate(text="dup", request_id="dup-1", max_tokens=2)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.message.startswith("request_id:")
        assert list(stream)[-1].finish_reason == "length"


def test_health_and_reflection_on_every_server(cluster) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    servers = [(cluster.router_address, "slotmesh.v1.Router")] + [
        (w.address, "slotmesh.v1.Worker") for w in cluster.workers]
    for address, service in servers:
        with grpc.insecure_channel(address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for name in ("", service):
                resp = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
                watch = health.Watch(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
                watch.cancel()
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            [resp] = list(refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
            names = {s.name for s in resp.list_services_response.service}
            assert {service, "grpc.health.v1.Health"} <= names
            # what grpcurl does next: the service's file, then its imports by name, all
            # named relative to the proto root protos/ (buf's layout)
            files = reflected_files(refl, file_containing_symbol=service)
            file = files[f"slotmesh/v1/{service.rsplit('.', 1)[1].lower()}.proto"]
            assert list(file.dependency) == ["slotmesh/v1/common.proto"]
            files = reflected_files(refl, file_by_filename="slotmesh/v1/common.proto")
            assert files["slotmesh/v1/common.proto"].package == "slotmesh.v1"


def reflected_files(stub, **request) -> dict:
    """The slotmesh files of a reflection answer (a file comes with its imports), by name."""
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    [resp] = list(stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=5))
    files = [descriptor_pb2.FileDescriptorProto.FromString(blob)
             for blob in resp.file_descriptor_response.file_descriptor_proto]
    return {f.name: f for f in files if f.name.startswith("slotmesh/")}


def test_list_workers_and_info(cluster) -> None:
    with Client(cluster.router_address, timeout=5) as client:
        workers = client.list_workers()
    assert [w.worker_id for w in workers] == ["worker-0", "worker-1"]
    for w in workers:
        assert w.model and len(w.fingerprint) >= 16 and w.slots == 4
        assert w.kv_blocks_total > 0 and w.version and w.attention_backend
        assert w.weights == "float32 x18"  # the tiny llama's 18 linears + table, dense


def test_prometheus_metrics(cluster) -> None:
    with Client(cluster.router_address, timeout=30) as client:
        client.generate(text="metrics please", max_tokens=8, temperature=0, ignore_eos=True)
    router = scrape(cluster.router.metrics_address)
    assert metric_value(router, "slotmesh_router_time_to_first_token_seconds_count") >= 1
    assert metric_value(router, "slotmesh_router_inter_token_latency_seconds_count") >= 7
    assert metric_value(router, "slotmesh_router_e2e_request_latency_seconds_count") >= 1
    assert metric_value(router, "slotmesh_router_routed_requests_total") >= 1
    assert metric_value(router, "slotmesh_router_workers") == 2
    assert "slotmesh_router_prefix_affinity_hits_total" in router
    for w in cluster.workers:
        text = scrape(w.metrics_address)
        for name in ("slotmesh_worker_time_to_first_token_seconds_count",
                     "slotmesh_worker_kv_blocks_free", "slotmesh_worker_running_sequences",
                     "slotmesh_worker_waiting_sequences", "slotmesh_worker_kv_usage_ratio",
                     "slotmesh_worker_prefix_cache_queries_tokens_total",
                     "slotmesh_worker_prefix_cache_hits_tokens_total"):
            assert name in text, (w.name, name)


# what dashboards rate() or sum(): each must be a counter (vLLM's names in docs/metrics.md)
WORKER_COUNTERS = ("slotmesh_worker_prompt_tokens", "slotmesh_worker_generation_tokens",
                   "slotmesh_worker_num_preemptions",
                   "slotmesh_worker_prefix_cache_queries_tokens",
                   "slotmesh_worker_prefix_cache_hits_tokens",
                   "slotmesh_worker_prompt_tokens_saved", "slotmesh_worker_requests")
WORKER_HISTOGRAMS = ("slotmesh_worker_request_queue_time_seconds",
                     "slotmesh_worker_request_prompt_tokens",
                     "slotmesh_worker_request_generation_tokens",
                     "slotmesh_worker_time_to_first_token_seconds")


def test_worker_metrics_have_the_types_names_and_labels_dashboards_expect(cluster) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    def families(w):
        return {f.name: f for f in text_string_to_metric_families(scrape(w.metrics_address))}

    before = {w.name: scrape(w.metrics_address) for w in cluster.workers}
    with Client(cluster.router_address, timeout=30) as client:
        done = client.generate(text="count these tokens", max_tokens=6, temperature=0,
                               ignore_eos=True)
    worker = next(w for w in cluster.workers if w.name == done.worker_id)
    after = families(worker)
    for name in WORKER_COUNTERS:
        assert after[name].type == "counter", name
    for name in WORKER_HISTOGRAMS:
        assert after[name].type == "histogram", name
    text = scrape(worker.metrics_address)
    assert "_created" not in text  # no second series per counter
    [info] = after["slotmesh_worker_info"].samples
    model = info.labels["model_name"]
    assert model and info.labels["worker_id"] == worker.name and info.value == 1

    def grew(name: str, **labels) -> float:
        return (metric_sample(text, name, model_name=model, **labels)
                - metric_sample(before[worker.name], name, model_name=model, **labels))

    assert grew("slotmesh_worker_generation_tokens_total") == 6
    assert grew("slotmesh_worker_prompt_tokens_total") == done.num_prompt_tokens
    assert grew("slotmesh_worker_request_queue_time_seconds_count") == 1
    assert grew("slotmesh_worker_request_generation_tokens_sum") == 6
    assert grew("slotmesh_worker_request_prompt_tokens_sum") == done.num_prompt_tokens


def test_prefix_affinity_sends_a_continuation_to_the_same_worker(cluster) -> None:
    base = "A long shared system prompt that both turns start with. " * 4
    with Client(cluster.router_address, timeout=30) as client:
        first = client.generate(text=base, max_tokens=2, temperature=0)
        # the owner of the prefix is written behind: routing reads it once it is in Redis
        wait_metadata_flushed(cluster)
        owners = {client.generate(text=base + f" Turn {i}.", max_tokens=2,
                                  temperature=0).worker_id for i in range(4)}
    assert owners == {first.worker_id}



def test_servers_accept_the_keepalive_pings_of_our_channels() -> None:
    """A stream with no data for minutes (queued, long prefill, a reader that stopped)
    must not lose its connection to GOAWAY too_many_pings: servers allow pings at least
    as often as slotmesh's channels send them (gRPC's default allows one per 5 min)."""
    from services.rpc.plumbing import CHANNEL_OPTIONS, SERVER_OPTIONS

    allowed = dict(SERVER_OPTIONS)["grpc.http2.min_ping_interval_without_data_ms"]
    assert allowed < dict(CHANNEL_OPTIONS)["grpc.keepalive_time_ms"]
