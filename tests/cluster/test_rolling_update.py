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
from tests.cluster_harness import metric_value, scrape, tiny_cluster, wait_until
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
POLLS = "slotmesh_router_registry_polls_total"  # the router's successful registry refreshes


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


def test_the_drained_worker_restarted_under_its_id_takes_streams_within_two_polls(
        cluster, routers) -> None:
    """The rest of the rolling update above: the pod comes back under the same id (a
    StatefulSet keeps ids). The drain excluded the process that drained (its instance
    id), not the id, so every router routes to the new process from the first or second
    registry poll that can see its record — not after `drain_exclusion_s` (120 s)."""
    victim = cluster.workers[0]
    assert victim.proc.poll() == 0  # drained and stopped by the test above
    restarted = cluster.restart_worker(0)  # ready: its record is in Redis already
    polls = [polls_until_routable(router, 2) for router in cluster.routers]
    print(f"\nrestarted under its id: routable after {polls} registry polls (routers A, B)")
    assert all(n <= 2 for n in polls), polls
    listed = {w.worker_id: w.instance_id for w in routers[0].list_workers()}
    assert set(listed) == {victim.name, cluster.workers[1].name}
    assert all(listed.values())  # every process reports its instance
    # new streams: two at once through each router (short prompts: no prefix affinity),
    # one on each worker, the restarted one included
    for client in routers:
        wait_until(lambda c=client: all(w.num_running + w.num_waiting == 0
                                        for w in c.list_workers()), 30,
                   "both workers idle in the registry (least loaded then alternates)")
        streams = [client.stream(text=f"back {i}", max_tokens=MAX_TOKENS, ignore_eos=True,
                                 temperature=0) for i in range(2)]
        try:
            assert {next(s).worker_id for s in streams} == set(listed)
        finally:
            for s in streams:
                s.close()
    assert restarted.proc.poll() is None


def polls_until_routable(router, count: int, timeout_s: float = 30.0) -> int:
    """Registry polls the router makes from now until it routes to `count` workers. One
    scrape reads the poll counter before the workers gauge (services/rpc/metrics.py), so
    a poll landing mid-scrape can only make the count lower, never higher."""
    start = metric_value(scrape(router.metrics_address), POLLS)
    at: list[float] = []

    def routable() -> bool:
        text = scrape(router.metrics_address)
        if metric_value(text, "slotmesh_router_workers") != count:
            return False
        at.append(metric_value(text, POLLS))
        return True

    wait_until(routable, timeout_s, f"{router.name} to route to {count} workers")
    return int(at[0] - start)


def test_undrain_returns_a_worker_to_every_router(cluster, routers, capsys) -> None:
    """Drain an idle worker through router B (forwarded to A), then undrain it through
    the CLI against A: both routers route to it again as soon as the call returns, and
    its readiness is SERVING again. Unknown workers are NOT_FOUND, naming the worker."""
    from services.cli.main import main

    a, b = routers
    worker = cluster.workers[1]
    both = {w.worker_id for w in a.list_workers()}
    assert b.drain(worker.name) == (0, 0)
    for client in routers:  # excluded on both before Drain answered
        assert worker.name not in {w.worker_id for w in client.list_workers()}
    assert probe(worker.address) == 1
    assert main(["undrain", "--router", cluster.routers[0].address, worker.name]) == 0
    assert capsys.readouterr().out == f"{worker.name}: returned to routing\n"
    for client in routers:
        assert {w.worker_id for w in client.list_workers()} == both
    assert probe(worker.address) == 0
    assert b.undrain(worker.name) is False  # routable already: nothing to undo
    for call in (a.drain, a.undrain, b.undrain):
        with pytest.raises(RpcError) as e:
            call("no-such-worker")
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        assert "'no-such-worker'" in e.value.message
    assert main(["undrain", "--router", cluster.routers[1].address, "no-such-worker"]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err


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
