"""Live migration, drain and failover through a real router, workers and redis-server.

The model is a tiny random Gemma 3 (sliding-window and full-attention layers, so both KV
groups move) with a 4096-token context, which keeps sequences alive long enough to be
moved mid-stream. Every migrated stream is compared with the same request never
migrated: same tokens, same text, nothing lost, repeated or reordered.
"""

from __future__ import annotations

import threading

import grpc
import pytest

from protos.slotmesh.v1 import worker_pb2, worker_pb2_grpc
from services.client.clients import Client, RpcError
from services.rpc.plumbing import blocking_channel
from services.security.cluster_auth import caller_metadata
from tests.cluster_harness import (
    is_idle,
    metric_sample,
    metric_value,
    scrape,
    tiny_cluster,
    wait_until,
)
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.cluster  # real Redis and/or server processes

CLUSTER_KEY = bytes(range(100, 132))
CREDENTIAL = caller_metadata(CLUSTER_KEY)  # what a worker with the key asks its callers for
PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
MAX_TOKENS = 300
# every worker step lasts >= 10 ms, so a stream lasts >= 3 s on any machine: the tests
# below act on streams mid-way (migrate, kill, drain) and must never find them over
MIN_STEP_MS = 10
SAMPLING = {
    "greedy": {"temperature": 0.0},
    "seeded": {"temperature": 0.9, "top_k": 40, "top_p": 0.9, "min_p": 0.02, "seed": 1234},
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model("gemma3", tmp_path_factory.mktemp("gemma3-4k"), window=48,
                           max_positions=4096)


@pytest.fixture(scope="module")
def cluster(model_dir, redis_server, tmp_path_factory):
    """Three workers with a cluster key: every snapshot and prompt-cache entry moved
    here carries a MAC (worker/vocab/integrity.py), and every call to a worker needs the
    credential derived from the key (the router has it; the direct calls here send
    CREDENTIAL)."""
    logs = tmp_path_factory.mktemp("migration-logs")
    key_file = logs / "cluster.key"
    key_file.write_text(CLUSTER_KEY.hex())
    with tiny_cluster(model_dir, redis_server.url, logs, num_workers=3, slots=8,
                      worker_args=("--ctx", "4096", "--checkpoint-every", "64"),
                      min_step_ms=MIN_STEP_MS, cluster_key_file=key_file) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster.router_address, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def reference(client):
    """Each sampling mode's stream, never migrated."""
    out = {}
    for name, params in SAMPLING.items():
        done = client.generate(text=PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True, **params)
        out[name] = (done.token_ids, done.text)
    return out


def tokens(n: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(5, 500) for _ in range(n)]


def run(client: Client, request_id: str, params: dict, at: list[int], action) -> tuple:
    """Stream a request; when the client has seen at[0] tokens call action(workers seen)."""
    tokens, text, workers = [], "", []
    for chunk in client.stream(text=PROMPT, request_id=request_id, max_tokens=MAX_TOKENS,
                               ignore_eos=True, **params):
        tokens.extend(chunk.token_ids)
        text += chunk.text
        if chunk.worker_id:
            workers.append(chunk.worker_id)
        if at and len(tokens) >= at[0]:
            at.pop(0)
            action(workers)
    return tokens, text, workers


@pytest.mark.parametrize("mode", list(SAMPLING))
@pytest.mark.parametrize("times", [1, 2])
def test_migrated_stream_equals_unmigrated(client, reference, mode, times) -> None:
    rid = f"mig-{mode}-{times}"
    moves, owners = [], []

    def migrate(_seen) -> None:
        moves.append(client.migrate(rid))
        owners.append(client.get_sequence(rid).worker_id)  # the metadata follows

    tokens, text, workers = run(client, rid, SAMPLING[mode], [10, 20][:times], migrate)
    assert owners == [m.target_worker_id for m in moves]
    assert (tokens, text) == reference[mode]
    assert len(moves) == times
    assert all(m.num_tokens_at_migration >= 10 for m in moves)
    assert workers[0] == moves[0].source_worker_id
    for m in moves:
        assert m.target_worker_id != m.source_worker_id
    if times == 2:
        assert moves[1].source_worker_id == moves[0].target_worker_id


def test_tokens_only_migration_recomputes_and_matches(client, reference) -> None:
    rid = "mig-tokens-only"
    tokens, text, _ = run(client, rid, SAMPLING["seeded"], [10],
                          lambda _c: client.migrate(rid, kind="tokens_only"))
    assert (tokens, text) == reference["seeded"]


def test_migrate_unknown_and_bad_target(client) -> None:
    with pytest.raises(RpcError) as e:
        client.migrate("no-such-request")
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    stream = client.stream(text=PROMPT, request_id="mig-bad-target", max_tokens=MAX_TOKENS,
                           ignore_eos=True, temperature=0)
    first = next(stream)
    with pytest.raises(RpcError) as e:
        client.migrate("mig-bad-target", target_worker_id=first.worker_id)  # its own
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    assert list(stream)[-1].finish_reason == "length"


def test_failover_after_sigkill_continues_token_exact(cluster, client, reference) -> None:
    failovers = router_counter(cluster, "slotmesh_router_failovers_total")
    workers_seen: list[str] = []
    tokens, text, killed = [], "", False
    for chunk in client.stream(text=PROMPT, request_id="failover-1", max_tokens=MAX_TOKENS,
                               ignore_eos=True, **SAMPLING["seeded"]):
        if chunk.worker_id:
            workers_seen.append(chunk.worker_id)
        tokens.extend(chunk.token_ids)
        text += chunk.text
        if len(tokens) >= 10 and not killed:
            next(w for w in cluster.workers if w.name == workers_seen[0]).kill()
            killed = True
    try:
        assert (tokens, text) == reference["seeded"]
        assert len(workers_seen) == 2 and workers_seen[0] != workers_seen[1]
        assert router_counter(cluster, "slotmesh_router_failovers_total") == failovers + 1
    finally:
        back_to_three(cluster, client)


def back_to_three(cluster, client) -> None:
    """A new worker for the one a test stopped, and wait until the router lists exactly
    the three live ones: the next test migrates between them, and a target the router
    does not know yet (or a stopped one it still lists) is no target."""
    cluster.add_worker()
    live = sorted(w.name for w in live_workers(cluster))
    wait_until(lambda: sorted(w.worker_id for w in client.list_workers()) == live, 60,
               f"the router to list the live workers {live}")


def router_counter(cluster, name: str) -> float:
    return metric_value(scrape(cluster.router.metrics_address), name)


def test_sigterm_drains_through_the_router(cluster, client, reference) -> None:
    """The Kubernetes path: SIGTERM a worker mid-stream; it asks the router to migrate
    its sequences, then exits 0; the stream continues token-exact elsewhere."""
    code = {}
    tokens, text, workers = run(
        client, "sigterm-1", SAMPLING["seeded"], [10],
        lambda seen: code.setdefault("rc", next(
            w for w in cluster.workers if w.name == seen[-1]).terminate()))
    try:
        assert code["rc"] == 0
        assert (tokens, text) == reference["seeded"]
        assert len(workers) == 2 and workers[0] != workers[1]
    finally:
        back_to_three(cluster, client)


def test_save_to_file_and_restore_on_another_worker(cluster, client, reference,
                                                    tmp_path) -> None:
    from services.cli.main import main
    from services.cli.seq_files import unpack_parts
    from worker.snapshot import decode

    path = tmp_path / "seq.snap"
    saved = {}

    def save(chunk) -> None:
        owner = next(w for w in cluster.workers if w.name == chunk.worker_id)
        assert main(["seq", "save", "--worker", owner.address, "--cluster-key-file",
                     str(cluster.cluster_key_file), "file-1", str(path)]) == 0
        saved["owner"] = owner.name

    stream = client.stream(text=PROMPT, request_id="file-1", max_tokens=MAX_TOKENS,
                           ignore_eos=True, **SAMPLING["seeded"])
    seen = 0
    for chunk in stream:
        seen += len(chunk.token_ids)
        if chunk.worker_id:
            save(chunk)
        if seen >= 10:
            break
    stream.close()  # the original goes away; the file lives on
    parts = unpack_parts(path.read_bytes())
    snap = decode(parts[0], CLUSTER_KEY)
    done = len(snap.token_ids) - snap.num_prompt_tokens
    other = next(w for w in cluster.workers if w.name != saved["owner"]
                 and w.proc.poll() is None)
    msgs = restore(other.address, parts)
    assert msgs[0].num_resumed_tokens == done and not msgs[0].token_ids
    continuation = [t for m in msgs[1:] for t in m.token_ids]
    assert snap.token_ids[snap.num_prompt_tokens:] + continuation == reference["seeded"][0]


def restore(address: str, parts: list[bytes]) -> list:
    """RestoreSequence with a file's parts (the snapshot, then its checkpoints)."""
    from protos.slotmesh.v1 import common_pb2

    chunks = [common_pb2.SnapshotChunk(data=data[i:i + 65536], part=part)
              for part, data in enumerate(parts) for i in range(0, len(data), 65536)]
    with blocking_channel(address, metadata=CREDENTIAL) as ch:
        return list(worker_pb2_grpc.WorkerStub(ch).RestoreSequence(iter(chunks),
                                                                   timeout=120))


# -- the cluster-wide prompt cache ------------------------------------------------------

def worker_generate(address: str, **request):
    """Generate straight from one worker (no routing); returns the Completion."""
    from services.client.clients import Completion, build_request
    from services.rpc.convert import chunk_from_pb

    done = Completion()
    with blocking_channel(address, metadata=CREDENTIAL) as ch:
        for msg in worker_pb2_grpc.WorkerStub(ch).Generate(build_request(**request),
                                                          timeout=120):
            done.add(chunk_from_pb(msg))
    return done


def cold_tokens(model_dir, token_ids: list[int], max_tokens: int) -> list[int]:
    from worker.config import CacheConfig, EngineConfig, ModelConfig
    from worker.engine import LLMEngine
    from worker.vocab.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=ModelConfig(model=str(model_dir)), warmup=False,
                                    cache=CacheConfig(enable_prefix_caching=False)))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return engine.generate([token_ids], params)[0].token_ids


def live_workers(cluster) -> list:
    return [w for w in cluster.workers if w.proc.poll() is None]


def counter(worker, name: str, **labels) -> float:
    return metric_sample(scrape(worker.metrics_address), name, **labels)


def test_prompt_processed_on_one_worker_resumes_on_another(cluster, model_dir) -> None:
    a, b = live_workers(cluster)[:2]
    prompt = tokens(192, seed=21)
    continued = prompt + tokens(16, seed=22)
    written = counter(a, "slotmesh_worker_checkpoint_writes_total", result="written")
    worker_generate(a.address, token_ids=prompt, max_tokens=4, temperature=0.0)
    wait_until(lambda: counter(a, "slotmesh_worker_checkpoint_writes_total",
                               result="written") > written, 20, "A's checkpoint in Redis")
    saved = counter(b, "slotmesh_worker_prompt_tokens_saved_total", source="redis")
    done = worker_generate(b.address, token_ids=continued, max_tokens=8, temperature=0.0,
                           ignore_eos=True)
    assert done.num_cached_tokens == len(prompt)  # B computed only the 16 new tokens
    assert counter(b, "slotmesh_worker_prompt_tokens_saved_total", source="redis") == \
        saved + len(prompt)
    assert done.token_ids == cold_tokens(model_dir, continued, 8)


def test_file_keeps_checkpoints_for_a_rollback(cluster, client, redis_server,
                                               tmp_path) -> None:
    """llama.cpp loses SWA checkpoints on slot restore (its issue 28194); a slotmesh file
    keeps them: with Redis emptied of them, restoring the file brings them back, and a
    request that rolls the conversation back reuses one on a third worker."""
    import redis

    from services.cli.main import main
    from services.cli.seq_files import unpack_parts
    from worker.snapshot import decode

    path = tmp_path / "ckpt.seq"
    prompt = tokens(100, seed=23)
    stream = client.stream(token_ids=prompt, request_id="ckpt-file", max_tokens=MAX_TOKENS,
                           ignore_eos=True, temperature=0.0)
    seen, owner = 0, None
    for chunk in stream:
        owner = owner or next(w for w in cluster.workers if w.name == chunk.worker_id)
        seen += len(chunk.token_ids)
        if seen >= 140:  # checkpoints at 96 (prompt end), 160 and 224 by now
            assert main(["seq", "save", "--worker", owner.address, "--cluster-key-file",
                         str(cluster.cluster_key_file), "ckpt-file", str(path)]) == 0
            break
    stream.close()
    parts = unpack_parts(path.read_bytes())
    checkpoints = [decode(p, CLUSTER_KEY) for p in parts[1:]]
    positions = [c.num_computed_tokens for c in checkpoints]
    assert positions[:3] == [96, 160, 224]
    r = redis.Redis.from_url(redis_server.url)
    for key in r.scan_iter("slotmesh:{pc:*"):  # the prompt cache is lost
        r.delete(key)
    restorer, third = [w for w in live_workers(cluster) if w is not owner][:2]
    msgs = restore(restorer.address, parts)
    assert msgs[-1].finish_reason  # the restored sequence ran to its end
    sequence = decode(parts[0], CLUSTER_KEY).token_ids
    wait_until(lambda: any(decode(r.get(k), CLUSTER_KEY).num_computed_tokens == 224
                           for k in r.scan_iter("slotmesh:{pc:*:ckpt:*")), 20,
               "the file's checkpoint at 224 back in Redis")
    # edit the conversation at token 230 (newer checkpoints of the restored sequence
    # replaced its oldest ones, as --swa-checkpoints 4 asks)
    rollback = sequence[:230] + tokens(8, seed=24)
    done = worker_generate(third.address, token_ids=rollback, max_tokens=4,
                           temperature=0.0)
    assert done.num_cached_tokens == 224


DRAIN_TOKENS = 800  # long enough to outlive the setup below on a slow machine


def test_drain_moves_eight_running_sequences(cluster, client) -> None:
    want = client.generate(text=PROMPT, max_tokens=DRAIN_TOKENS, ignore_eos=True,
                           **SAMPLING["seeded"])
    live = [w for w in cluster.workers if w.proc.poll() is None]
    keep, others = live[0], live[1:]
    wait_until(lambda: len(client.list_workers()) == len(live), 20, "registry settles")
    for w in others:  # everything new goes to `keep`
        set_draining(w.address, True)
    wait_until(lambda: [x.worker_id for x in client.list_workers()] == [keep.name], 10,
               "only one routable worker")
    results: dict[int, tuple] = {}
    started = threading.Barrier(9)

    def one(i: int) -> None:
        stream = client.stream(text=PROMPT, request_id=f"drain-{i}", max_tokens=DRAIN_TOKENS,
                               ignore_eos=True, **SAMPLING["seeded"])
        first = next(stream)
        started.wait()
        rest = list(stream)
        results[i] = (first, rest)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    started.wait(60)
    for w in others:
        set_draining(w.address, False)
    wait_until(lambda: len(client.list_workers()) == len(live), 10, "others routable again")
    migrated, failed = client.drain(keep.name)
    for t in threads:
        t.join(120)
    assert (migrated, failed) == (8, 0)
    for i in range(8):
        first, rest = results[i]
        chunks = [first, *rest]
        assert first.worker_id == keep.name
        assert [c.worker_id for c in chunks if c.worker_id][1:], "continued elsewhere"
        assert all(c.worker_id != keep.name for c in chunks[1:] if c.worker_id)
        tokens = [t for c in chunks for t in c.token_ids]
        assert (tokens, "".join(c.text for c in chunks)) == (want.token_ids, want.text)
    wait_until(lambda: is_idle(keep.address, CREDENTIAL), 10, "drained worker idle")


def set_draining(address: str, draining: bool) -> None:
    with blocking_channel(address, metadata=CREDENTIAL) as ch:
        worker_pb2_grpc.WorkerStub(ch).SetDraining(
            worker_pb2.SetDrainingRequest(draining=draining), timeout=5)


def test_migration_metrics(cluster, client) -> None:
    """One migration of its own moves every migration metric (the counts are deltas, so
    the test passes alone and in any order)."""
    def snapshot() -> dict[str, float]:
        router = scrape(cluster.router.metrics_address)
        workers = "".join(scrape(w.metrics_address) for w in live_workers(cluster))
        return {
            "ok": metric_value(router, 'slotmesh_router_migrations_total{result="ok"}'),
            "bytes": metric_value(router, "slotmesh_router_migration_bytes_total"),
            "timed": metric_value(router, "slotmesh_router_migration_duration_seconds_count"),
            "imported": metric_value(workers, "slotmesh_worker_imported_sequences_total"),
            "exported": metric_value(
                workers, 'slotmesh_worker_snapshot_bytes_total{direction="export"}'),
        }

    before = snapshot()
    moves = []
    run(client, "mig-metrics", SAMPLING["greedy"], [5],
        lambda _seen: moves.append(client.migrate("mig-metrics")))
    after = snapshot()
    assert len(moves) == 1
    assert after["ok"] == before["ok"] + 1
    assert after["timed"] == before["timed"] + 1
    assert after["imported"] == before["imported"] + 1
    assert after["bytes"] - before["bytes"] == moves[0].snapshot_bytes > 0
    assert after["exported"] > before["exported"]
