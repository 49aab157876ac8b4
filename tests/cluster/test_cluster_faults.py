"""Faults over loopback with real processes: Redis missing at start, workers stopped
cleanly or killed, Redis stopped and restarted under load."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import grpc
import pytest
import redis

from services.client.clients import Client, RpcError
from services.local.redis_server import RedisServer, free_port
from services.metadata import keys
from tests.cluster_harness import tiny_cluster, wait_until

pytestmark = pytest.mark.cluster  # real Redis and/or server processes

TTL_S = 2.0  # heartbeat expiry of the workers in these tests
POLL_S = 0.25  # the router's registry poll
MIN_STEP_MS = 10  # a 300-token stream lasts >= 3 s: long enough to stop Redis under it


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.mark.parametrize("service", ["router", "worker"])
def test_redis_unreachable_at_start_is_a_clear_error(service, model_dir) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    argv = [sys.executable, "-m", "services.cli", service, "--port", "0", "--redis-url", url]
    if service == "worker":
        argv += ["--model", str(model_dir)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert f"Redis at {url} unavailable" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def worker_ids(client: Client) -> list[str]:
    return [w.worker_id for w in client.list_workers()]


def test_stopped_and_killed_workers_leave_routing(model_dir, tmp_path) -> None:
    with RedisServer() as redis_server, tiny_cluster(
            model_dir, redis_server.url, tmp_path, num_workers=3, heartbeat_ttl_s=TTL_S,
            registry_poll_s=POLL_S) as cluster, Client(cluster.router_address,
                                                       timeout=30) as client:
        assert worker_ids(client) == ["worker-0", "worker-1", "worker-2"]
        # a clean stop deregisters at once: gone well before the heartbeat would expire
        stopped = cluster.workers[2]
        assert stopped.terminate() == 0
        took = wait_until(lambda: worker_ids(client) == ["worker-0", "worker-1"], TTL_S,
                          "cleanly stopped worker to leave")
        assert took < TTL_S
        # a killed worker is gone within the heartbeat expiry (+ one registry poll)
        killed = cluster.workers[1]
        killed.kill()
        t0 = time.monotonic()
        results = []
        while "worker-1" in worker_ids(client):
            # requests routed meanwhile still succeed: the dead worker is skipped
            results.append(client.generate(text="still there?", max_tokens=4,
                                           temperature=0, ignore_eos=True))
        gone_after = time.monotonic() - t0
        assert gone_after <= TTL_S + 2 * POLL_S + 0.5, gone_after
        results += [client.generate(text=f"after {i}", max_tokens=4, temperature=0,
                                    ignore_eos=True) for i in range(4)]
        assert all(r.finish_reason == "length" and len(r.token_ids) == 4 for r in results)
        assert {r.worker_id for r in results[-4:]} == {"worker-0"}


def test_redis_outage_under_load(model_dir, tmp_path) -> None:
    with RedisServer() as redis_server, tiny_cluster(
            model_dir, redis_server.url, tmp_path, heartbeat_ttl_s=TTL_S,
            registry_poll_s=POLL_S, min_step_ms=MIN_STEP_MS) as cluster, Client(
            cluster.router_address, timeout=60) as client:
        streams = [client.stream(text=f"in flight {i}", max_tokens=300, temperature=0,
                                 ignore_eos=True) for i in range(4)]
        # each has its first token: running, and (paced) at least 3 s from its end
        firsts = [next(s) for s in streams]
        redis_server.stop()
        outcomes = [[first, *s] for first, s in zip(firsts, streams, strict=True)]
        # in-flight requests finished
        assert all(chunks[-1].finish_reason == "length" for chunks in outcomes)
        assert all(sum(len(c.token_ids) for c in chunks) == 300 for chunks in outcomes)
        # new requests are still routed to the workers the router knew, for longer than a
        # heartbeat expiry
        time.sleep(TTL_S)  # the outage itself is the test: let heartbeats lapse
        during = [client.generate(text=f"during {i}", max_tokens=4, temperature=0)
                  for i in range(4)]
        assert all(r.token_ids for r in during)
        assert worker_ids(client) == ["worker-0", "worker-1"]
        router_log = (tmp_path / "router.log").read_text()
        assert "Redis unreachable" in router_log
        # Redis comes back empty: heartbeats re-register, the registry resumes
        redis_server.start()
        extra = cluster.add_worker()
        wait_until(lambda: worker_ids(client) == ["worker-0", "worker-1", extra.name], 10,
                   "registry to resume with the new worker")
        wait_until(lambda: "registry resumed" in (tmp_path / "router.log").read_text(), 5,
                   "router to log the recovery")
        rdb = redis.Redis.from_url(redis_server.url)
        stream = client.stream(text="metadata again", request_id="after-outage",
                               max_tokens=300, temperature=0, ignore_eos=True)  # >= 3 s
        next(stream)
        wait_until(lambda: rdb.get(keys.sequence("after-outage")) is not None, 5,
                   "slot metadata written to Redis again")
        stream.close()
        rdb.close()


def test_slotmesh_up_restarts_a_killed_worker_and_stops_only_on_sigint(model_dir,
                                                                       tmp_path) -> None:
    """The real command: kill -9 of a worker does not stop the cluster; `up` logs the
    exit, starts the worker again under its id and keeps serving; SIGINT stops every
    process cleanly (the restarted worker included) and Redis with them."""
    from services.cli.main import main
    from services.local.process import LineReader

    up = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", "--workers", "2", "--port", "0",
         "--model", str(model_dir), "--log-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = LineReader(up.stdout), LineReader(up.stderr)
    try:
        ready = out.wait_for(lambda ln: "slotmesh up: ready" in ln, 120)
        assert ready, out.seen
        router = next(ln.split()[1] for ln in out.seen if ln.startswith("router"))
        redis_url = next(ln.split()[1] for ln in out.seen if ln.startswith("redis"))
        key_file = next(ln.split()[1] for ln in out.seen if ln.startswith("key"))
        assert len(bytes.fromhex(Path(key_file).read_text().strip())) == 32  # the key it uses
        os.kill(child_pid(up.pid, "worker-1"), signal.SIGKILL)
        assert err.wait_for(lambda ln: "worker-1 restarted" in ln, 120), err.seen
        assert any("worker-1 exited (killed by SIGKILL)" in ln for ln in err.seen), err.seen
        assert up.poll() is None
        with Client(router, timeout=30) as client:
            wait_until(lambda: len(client.list_workers()) == 2, 30, "worker-1 back")
        assert main(["generate", "--router", router, "hello", "--temperature", "0",
                     "--max-tokens", "3"]) == 0
        assert redis_url.startswith("redis://slotmesh:***@")  # an ACL user, masked
        anonymous = redis.Redis(host="127.0.0.1", port=urllib.parse.urlsplit(redis_url).port)
        with pytest.raises(redis.AuthenticationError, match=r"NOAUTH|authenticated"):
            anonymous.ping()
        anonymous.close()
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0
    finally:
        if up.poll() is None:
            up.kill()
    assert out.wait_for(lambda ln: "stopped" in ln, 5).endswith(
        "stopped (worker-0=0, worker-1=0, router=0)")
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(redis_url, socket_connect_timeout=1).ping()


def child_pid(parent_pid: int, worker_id: str) -> int:
    """The pid of the parent's child process started with `--worker-id worker_id`."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue  # a process that ended meanwhile
        if ppid == parent_pid and worker_id.encode() in argv and b"--worker-id" in argv:
            return int(stat.parent.name)
    raise AssertionError(f"no child process {worker_id} of {parent_pid}")


def test_full_queues_are_resource_exhausted_and_other_streams_continue(model_dir,
                                                                       tmp_path) -> None:
    """One slot and no queue per worker, two workers: two requests run, the third finds
    every worker full (the router tries both) and is refused."""
    with RedisServer() as redis_server, tiny_cluster(
            model_dir, redis_server.url, tmp_path, slots=1, min_step_ms=MIN_STEP_MS,
            worker_args=("--max-waiting", "0")) as cluster, Client(
            cluster.router_address, timeout=60) as client:
        streams = [client.stream(text=f"long {i}", max_tokens=480, temperature=0,
                                 ignore_eos=True) for i in range(2)]
        firsts = [next(s) for s in streams]  # both running (>= 4.8 s), one on each worker
        assert {c.worker_id for c in firsts} == {"worker-0", "worker-1"}
        with pytest.raises(RpcError) as e:
            client.generate(text="one too many", max_tokens=4)
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value
        assert "queue full" in e.value.message
        for s in streams:
            assert list(s)[-1].finish_reason == "length"
        assert client.generate(text="room again", max_tokens=4).finish_reason == "length"
