"""`slotmesh up`'s supervision with real processes (the LocalCluster and Supervisor that
`up` runs, a real redis-server): a worker killed with SIGKILL under load loses no
stream — each one fails over token-exact — and comes back under its id as a new
process, and then both workers serve."""

from __future__ import annotations

import threading
import time

import pytest

from services.client.clients import Client
from tests.cluster.test_cluster import reference_outputs
from tests.cluster_harness import tiny_cluster, wait_until
from worker.vocab.sampling_params import SamplingParams

pytestmark = pytest.mark.cluster  # real Redis and/or server processes

NUM_STREAMS = 6  # 2 workers x 4 slots: all of them run at once
MAX_TOKENS = 200
MIN_STEP_MS = 10  # every step >= 10 ms: a stream lasts >= 2 s, so the kill finds it running
# short prompts (under one 64-byte prefix block): no prefix affinity, least loaded spreads them
PROMPTS = [f"Supervised stream {i}: once upon a time" for i in range(NUM_STREAMS)]
GREEDY = {"max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


def test_a_worker_killed_under_load_fails_over_exactly_and_comes_back(
        model_dir, redis_server, tmp_path) -> None:
    want = reference_outputs(model_dir, PROMPTS, SamplingParams(**GREEDY))
    log = tmp_path / "supervisor.log"
    with tiny_cluster(model_dir, redis_server.url, tmp_path, heartbeat_ttl_s=2.0,
                      min_step_ms=MIN_STEP_MS) as cluster, \
            open(log, "w") as out, Client(cluster.router_address, timeout=120) as client:
        supervisor = cluster.supervised(out=out).start()
        try:
            instances = {w.worker_id: w.instance_id for w in client.list_workers()}
            results, started, threads = run_streams(client)
            started.wait(120)  # every stream has tokens: all are running
            on = [results[i][0].worker_id for i in range(NUM_STREAMS)]
            victim = max(instances, key=on.count)
            t0 = time.monotonic()
            next(w for w in cluster.workers if w.name == victim).kill()  # SIGKILL
            # the restart runs while the streams fail over and finish
            wait_until(lambda: listed_instance(client, victim) not in (
                None, instances[victim]), 120, "the new process in the registry")
            back_s = time.monotonic() - t0
            assert supervisor.restarts[victim] == 1
            for t in threads:
                t.join(120)
            for i in range(NUM_STREAMS):
                chunks = results[i]
                assert [t for c in chunks for t in c.token_ids] == want[i], f"stream {i}"
                assert chunks[-1].finish_reason == "length"
                if on[i] == victim:  # it failed over: its last chunks came from the other
                    assert [c.worker_id for c in chunks if c.worker_id][-1] != victim
            print(f"\nkill -9 of {victim} under {NUM_STREAMS} streams ({on.count(victim)} on "
                  f"it): routable again as a new process {back_s:.1f} s after the kill")
            assert_both_serve(client, want)
        finally:
            supervisor.stop()
    text = log.read_text()
    assert f"{victim} exited (killed by SIGKILL); restarting in 0.5 s" in text, text
    assert f"{victim} restarted (127.0.0.1:" in text, text


def run_streams(client: Client) -> tuple[dict[int, list], threading.Barrier, list]:
    """Start every stream in its own thread; the barrier opens once each has tokens."""
    results: dict[int, list] = {}
    started = threading.Barrier(NUM_STREAMS + 1)

    def one(i: int) -> None:
        stream = client.stream(text=PROMPTS[i], request_id=f"sup-{i}", **GREEDY)
        chunks = [next(stream)]
        while sum(len(c.token_ids) for c in chunks) < 5:
            chunks.append(next(stream))
        results[i] = chunks
        started.wait()
        chunks.extend(stream)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(NUM_STREAMS)]
    for t in threads:
        t.start()
    return results, started, threads


def listed_instance(client: Client, worker_id: str) -> str | None:
    return next((w.instance_id for w in client.list_workers() if w.worker_id == worker_id),
                None)


def assert_both_serve(client: Client, want: list[list[int]]) -> None:
    """Two streams at once from an idle cluster go one to each worker (least loaded),
    and both are token-exact."""
    wait_until(lambda: all(w.num_running + w.num_waiting == 0 for w in client.list_workers()),
               30, "both workers idle in the registry")
    streams = [client.stream(text=PROMPTS[i], **GREEDY) for i in range(2)]
    firsts = [next(s) for s in streams]
    assert len({c.worker_id for c in firsts}) == 2
    for i, (first, rest) in enumerate(zip(firsts, streams, strict=True)):
        assert [*first.token_ids, *(t for c in rest for t in c.token_ids)] == want[i]
