"""Two routers, two workers and a real redis-server: any router migrates and drains any
sequence, and a worker leaves the way Kubernetes retires a pod without dropping a stream.

The model is a tiny random Gemma 3 with a 4096-token context (as in test_migration.py),
so sequences live long enough to be moved mid-stream. Every stream is compared with the
same request run in-process, never migrated: sampling is keyed by (seed, position), so
the tokens must be identical.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time

import grpc
import pytest

from services.client.clients import Client, Completion, RpcError
from services.rpc.health_probe import check
from services.rpc.plumbing import LIVENESS_SERVICE
from tests.cluster.test_migration import PROMPT, SAMPLING, set_draining
from tests.cluster.test_migration import model_dir as model_dir  # the same tiny 4k-context Gemma 3
from tests.cluster_harness import tiny_cluster, wait_until
from worker.config import EngineConfig, ModelConfig
from worker.engine import LLMEngine
from worker.vocab.sampling_params import SamplingParams

pytestmark = pytest.mark.cluster  # real Redis and/or server processes

NUM_STREAMS = 8
MAX_TOKENS = 600  # outlives the drain below on a slow machine
# every worker step lasts >= 40 ms, so a MAX_TOKENS stream lasts >= 24 s on any machine:
# the preStop drain below starts two Python processes first (the health probe, then
# `slotmesh drain`), which took ~10 s on a 2-core machine with two CPU hogs beside the
# suite, and the streams must still be running when it arrives (10 ms was not enough)
MIN_STEP_MS = 40
TAKEOVER_TOKENS = 300  # outlives the kill below by a wide margin
GRACE_S = 30.0  # the worker's --shutdown-grace, as terminationGracePeriodSeconds bounds it


def seeded(i: int) -> dict:
    return {**SAMPLING["seeded"], "seed": 1000 + i}


@pytest.fixture(scope="module")
def cluster(model_dir, redis_server, tmp_path_factory):
    logs = tmp_path_factory.mktemp("rolling-logs")
    with tiny_cluster(model_dir, redis_server.url, logs, num_workers=2, slots=NUM_STREAMS,
                      worker_args=("--ctx", "4096", "--shutdown-grace", str(GRACE_S)),
                      min_step_ms=MIN_STEP_MS) as c:
        c.add_router()
        yield c


@pytest.fixture(scope="module")
def routers(cluster):
    with Client(cluster.routers[0].address, timeout=120) as a, \
            Client(cluster.routers[1].address, timeout=120) as b:
        yield a, b


@pytest.fixture(scope="module")
def reference(model_dir) -> list[list[int]]:
    """Each stream's tokens from the in-process engine, in one batch, never migrated."""
    engine = LLMEngine(EngineConfig(model=ModelConfig(model=str(model_dir), max_model_len=4096),
                                    warmup=False))
    ids = engine.encode_prompt(prompt=PROMPT)
    for i in range(NUM_STREAMS):  # one request per seed, batched by the engine
        engine.add_request(f"ref-{i}", ids, SamplingParams(max_tokens=MAX_TOKENS,
                                                           ignore_eos=True, **seeded(i)))
    tokens: dict[str, list[int]] = {f"ref-{i}": [] for i in range(NUM_STREAMS)}
    while engine.has_unfinished:
        for chunk in engine.step():
            tokens[chunk.request_id].extend(chunk.token_ids)
    return [tokens[f"ref-{i}"] for i in range(NUM_STREAMS)]


def test_any_router_migrates_a_stream_another_router_relays(cluster, routers,
                                                            reference) -> None:
    a, b = routers
    moves = []
    tokens, workers = [], []
    for chunk in a.stream(text=PROMPT, request_id="xr-1", max_tokens=MAX_TOKENS,
                          ignore_eos=True, **seeded(0)):
        tokens.extend(chunk.token_ids)
        if chunk.worker_id:
            workers.append(chunk.worker_id)
        if len(tokens) >= 10 and not moves:
            moves.append(b.migrate("xr-1"))  # B does not relay it: forwarded to A
            wait_until(lambda: b.get_sequence("xr-1").worker_id == moves[0].target_worker_id,
                       5, "the new owner in Redis (written behind)")
    assert tokens == reference[0]
    assert workers == [moves[0].source_worker_id, moves[0].target_worker_id]
    with pytest.raises(RpcError) as e:
        b.migrate("no-such-request")
    assert e.value.code == grpc.StatusCode.NOT_FOUND


def test_rolling_update_of_a_worker_keeps_every_stream(cluster, routers, reference) -> None:
    """The Kubernetes sequence for one worker pod: preStop (`slotmesh drain` against a
    router that relays only half of the worker's streams), then SIGTERM, then at most the
    grace period. 8 streams (4 through each router) all finish token-exact, and the
    worker exits 0 in time."""
    results: dict[int, list] = {}
    started = threading.Barrier(NUM_STREAMS + 1)

    def one(i: int) -> None:
        client = routers[i % 2]
        stream = client.stream(text=PROMPT, request_id=f"roll-{i}", max_tokens=MAX_TOKENS,
                               ignore_eos=True, **seeded(i))
        chunks = [next(stream)]
        while sum(len(c.token_ids) for c in chunks) < 5:
            chunks.append(next(stream))
        started.wait()
        chunks.extend(stream)
        results[i] = chunks

    # every stream starts on the victim, so its drain involves both routers' streams
    victim, other = cluster.workers
    victim_id = victim.name
    with only_routable(victim, other, routers):
        threads = [threading.Thread(target=one, args=(i,)) for i in range(NUM_STREAMS)]
        for t in threads:
            t.start()
        started.wait(120)

    assert probe(victim.address) == 0  # the image's HEALTHCHECK: ready
    t0 = time.monotonic()
    prestop = subprocess.run(
        [sys.executable, "-m", "services.cli", "drain", "--router", cluster.routers[1].address,
         "--worker-id", victim_id, "--timeout", str(GRACE_S)],
        capture_output=True, text=True, timeout=GRACE_S + 30)
    drain_s = time.monotonic() - t0
    assert prestop.returncode == 0, prestop.stderr
    assert probe(victim.address) == 1  # readiness NOT_SERVING while draining ...
    assert check(victim.address, LIVENESS_SERVICE)  # ... but alive: no restart
    t1 = time.monotonic()
    code = victim.terminate(timeout_s=GRACE_S)  # SIGTERM, SIGKILL after the grace period
    exit_s = time.monotonic() - t1
    for t in threads:
        t.join(120)

    assert code == 0 and exit_s < GRACE_S
    migrated = int(prestop.stdout.split(": ")[1].split()[0])
    print(f"\nrolling update: preStop drain {drain_s:.2f} s ({prestop.stdout.strip()}), "
          f"SIGTERM to exit {exit_s:.2f} s")
    on_victim = [i for i in range(NUM_STREAMS) if results[i][0].worker_id == victim_id]
    assert migrated == len(on_victim) == NUM_STREAMS  # 4 relayed by each router
    for i in range(NUM_STREAMS):
        chunks = results[i]
        assert [t for c in chunks for t in c.token_ids] == reference[i], f"stream {i}"
        assert chunks[-1].finish_reason == "length"
        if i in on_victim:
            assert [c.worker_id for c in chunks if c.worker_id][-1] != victim_id


def probe(address: str) -> int:
    """The containers' HEALTHCHECK command (deploy/docker) against a live process."""
    return subprocess.run([sys.executable, "-m", "services.rpc.health_probe", address],
                          timeout=30).returncode


@contextlib.contextmanager
def only_routable(worker, other, routers):
    """`other` refuses new sequences (as while draining) inside the block, so every
    router routes to `worker`; afterwards both routers see both workers again."""
    set_draining(other.address, True)
    for client in routers:
        wait_until(lambda c=client: [w.worker_id for w in c.list_workers()] == [worker.name],
                   10, "only one routable worker")
    try:
        yield
    finally:
        set_draining(other.address, False)
        for client in routers:
            wait_until(lambda c=client: len(c.list_workers()) == 2, 10, "both routable")


def test_another_router_takes_over_when_the_relaying_router_dies(cluster, routers) -> None:
    """Router A is killed mid-stream (last: the module's workers drain through A). The
    client resumes on router B with what it received and no seed: B takes the seed the
    worker drew from the sequence's Redis record, and the stream continues token-exact."""
    a, b = routers
    params = {k: v for k, v in SAMPLING["seeded"].items() if k != "seed"}
    received = Completion()
    seed = 0
    with pytest.raises(RpcError) as e:
        for chunk in a.stream(text=PROMPT, request_id="takeover-1", max_tokens=TAKEOVER_TOKENS,
                              ignore_eos=True, **params):
            received.add(chunk)
            seed = seed or chunk.seed
            if len(received.token_ids) >= 10 and cluster.routers[0].proc.poll() is None:
                wait_until(lambda: b.get_sequence("takeover-1").status == "running", 5,
                           "the running record (with the seed) in Redis")
                cluster.routers[0].kill()
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    rest = b.generate(text=PROMPT, request_id="takeover-1", max_tokens=TAKEOVER_TOKENS,
                      ignore_eos=True, resume=received, **params)
    want = b.generate(text=PROMPT, max_tokens=TAKEOVER_TOKENS, ignore_eos=True, seed=seed,
                      **params)
    assert seed and received.token_ids
    assert received.token_ids + rest.token_ids == want.token_ids
    assert received.text + rest.text == want.text
