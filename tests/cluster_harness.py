"""Helpers for tests that run real router and worker processes over loopback."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from services.local.cluster import LocalCluster


def tiny_cluster(model_dir: Path, redis_url: str, log_dir: Path, *, num_workers: int = 2,
                 heartbeat_ttl_s: float = 6.0, registry_poll_s: float = 0.25,
                 slots: int = 4, worker_args: tuple[str, ...] = (),
                 router_args: tuple[str, ...] = (), min_step_ms: float = 0.0,
                 cluster_key_file: Path | None = None,
                 http_port: int | None = None) -> LocalCluster:
    """Router + workers on a tiny model, against an already running Redis. With a
    cluster key, the router and the workers have it (workers then take calls only with
    the credential derived from it, services/security/cluster_auth.py). min_step_ms: every
    engine step lasts at least this long, so a stream of N tokens outlives N * min_step_ms
    on a machine of any speed and a test can act on it mid-stream. http_port: also the
    HTTP gateway (0 = a free port)."""
    pace = ["--min-step-ms", str(min_step_ms)] if min_step_ms else []
    return LocalCluster(
        worker_args=["--model", str(model_dir), "--slots", str(slots), "--kv-cache-mb", "16",
                     *pace, *worker_args],
        num_workers=num_workers, redis_url=redis_url, heartbeat_ttl_s=heartbeat_ttl_s,
        registry_poll_s=registry_poll_s, metrics=True, log_dir=log_dir,
        router_args=list(router_args), cluster_key_file=cluster_key_file,
        http_port=http_port)


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str,
               interval_s: float = 0.05) -> float:
    """Poll a condition with a deadline (a state change in another process); return the
    seconds it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)
    return time.monotonic() - start


def worker_info(address: str, metadata: tuple[tuple[str, str], ...] = ()):
    """The Worker.Info of one worker (kv blocks, load). metadata: the cluster credential
    of a worker with a cluster key."""
    from protos.slotmesh.v1 import worker_pb2, worker_pb2_grpc
    from services.rpc.plumbing import channel

    async def call():
        async with channel(address, metadata=metadata) as ch:
            return await worker_pb2_grpc.WorkerStub(ch).Info(worker_pb2.InfoRequest(),
                                                             timeout=5)

    return asyncio.run(call())


def is_idle(address: str, metadata: tuple[tuple[str, str], ...] = ()) -> bool:
    info = worker_info(address, metadata)
    return (info.load.num_running == 0 and info.load.num_waiting == 0
            and info.load.kv_blocks_free == info.load.kv_blocks_total)


def scrape(metrics_address: str) -> str:
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5) as r:
        return r.read().decode()


def metric_sample(text: str, name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels` (others may follow)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


def metric_value(text: str, name: str) -> float:
    """Sum of a metric's samples named exactly `name` (any labels)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total



def wait_metadata_flushed(cluster, timeout_s: float = 30.0) -> None:
    """Until every live router has written all its pending sequence metadata to Redis
    (its write-behind gauge is 0): what Redis holds then is what the routers meant."""
    routers = [r for r in cluster.routers if r.proc.poll() is None]
    wait_until(lambda: all(metric_value(scrape(r.metrics_address),
                                        "slotmesh_router_metadata_pending") == 0
                           for r in routers), timeout_s, "routers' metadata flushed")


def sequence_keys(redis_url: str) -> list[str]:
    """Every sequence record in Redis (slotmesh:seq:*)."""
    import redis

    from services.metadata import keys

    with redis.Redis.from_url(redis_url) as rdb:
        return sorted(k.decode() for k in rdb.scan_iter(keys.sequence("*")))
