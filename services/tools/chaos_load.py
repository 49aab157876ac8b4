"""What `slotmesh chaos` measures with: seeded streams and how they are scored against
a reference, per-process RSS and file descriptors, and the leak checks (KV blocks on
workers, sequence records in Redis, streams the router still relays).

Every stream is a seeded, sampled request (temperature 0.8, top-k 40) with ignore_eos,
so it always produces exactly max_tokens tokens, and the tokens are a function of
(prompt, seed, position) only: any run of the same request, faulted or not, must
deliver the same list.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
import urllib.request
from dataclasses import dataclass, field

from services.client.clients import AsyncClient, RpcError

PROMPT = ("Distributed systems trade one kind of difficulty for another: a single machine "
          "fails all at once, a cluster fails a little at a time, and most of the work "
          "goes into noticing and recovering from those partial failures.")


def request(index: int, max_tokens: int) -> dict:
    """The request of stream `index` (its prompt and seed depend on the index only)."""
    return dict(text=f"{index}. {PROMPT}", max_tokens=max_tokens, temperature=0.8,
                top_k=40, top_p=0.95, min_p=0.0, seed=1000 + index, ignore_eos=True)


@dataclass(slots=True)
class Outcome:
    """What one client stream received."""

    index: int
    tokens: list[int] = field(default_factory=list)
    stamps: list[float] = field(default_factory=list)  # monotonic arrival per token chunk
    finish_reason: str | None = None
    error: str = ""
    worker_id: str = ""

    @property
    def is_complete(self) -> bool:
        return self.finish_reason == "length" and not self.error


async def consume(client: AsyncClient, out: Outcome, max_tokens: int, *,
                  request_id: str = "", stop_after: int | None = None) -> Outcome:
    """Read stream out.index into `out`; stop (cancel) after `stop_after` tokens. An
    RpcError is recorded, not raised; cancellation of the task cancels the call."""
    req = request(out.index, max_tokens)
    try:
        async with contextlib.aclosing(client.stream(**req, request_id=request_id)) as chunks:
            async for chunk in chunks:
                out.worker_id = out.worker_id or chunk.worker_id
                if chunk.token_ids:
                    out.tokens.extend(chunk.token_ids)
                    out.stamps.append(time.monotonic())
                out.finish_reason = chunk.finish_reason or out.finish_reason
                out.error = chunk.error or out.error
                if stop_after is not None and len(out.tokens) >= stop_after:
                    break
    except RpcError as e:
        out.error = str(e)
    return out


def score(outcomes: list[Outcome], reference: dict[int, list[int]]) -> dict:
    """Streams completed and token-exact against the reference; tokens lost, duplicated
    (delivered beyond the reference's length) and wrong (differing within it)."""
    lost = dup = wrong = exact = 0
    for o in outcomes:
        ref = reference[o.index]
        lost += max(0, len(ref) - len(o.tokens))
        dup += max(0, len(o.tokens) - len(ref))
        wrong += sum(a != b for a, b in zip(o.tokens, ref, strict=False))
        exact += o.tokens == ref and o.is_complete
    completed = sum(o.is_complete for o in outcomes)
    return {"streams": len(outcomes), "completed": completed, "token_exact": exact,
            "lost_streams": len(outcomes) - completed, "lost_tokens": lost,
            "duplicated_tokens": dup, "wrong_tokens": wrong,
            "data_lost": len(outcomes) - exact,
            "errors": sorted({o.error for o in outcomes if o.error})[:3]}


def prefix_exact(outcomes: list[Outcome], reference: dict[int, list[int]]) -> int:
    """Streams whose tokens (however many arrived) are a prefix of the reference."""
    return sum(o.tokens == reference[o.index][:len(o.tokens)] for o in outcomes)


def gaps_s(outcomes: list[Outcome]) -> list[float]:
    """Inter-token latencies as clients saw them (between chunks that carry tokens)."""
    return [b - a for o in outcomes for a, b in zip(o.stamps, o.stamps[1:], strict=False)]


def timed_gaps(outcomes: list[Outcome]) -> list[tuple[float, float]]:
    """(arrival, gap) pairs, to cut into time windows."""
    return [(b, b - a) for o in outcomes
            for a, b in zip(o.stamps, o.stamps[1:], strict=False)]


def pct_ms(values: list[float], q: int) -> float:
    if not values:
        return 0.0
    if len(values) < 2:
        return round(values[0] * 1000, 2)
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000, 2)


# -- processes ------------------------------------------------------------------------------

def proc_stats(pid: int) -> tuple[int, int] | None:
    """(resident bytes, open file descriptors) of a live process; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rss_kb = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
        return rss_kb * 1024, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return None


def cluster_pids(cluster) -> dict[str, int]:
    """Every live process of the cluster by name: routers, workers, redis."""
    pids = {p.name: p.proc.pid for p in (*cluster.routers, *cluster.workers)
            if p.proc.poll() is None}
    if cluster.redis is not None and cluster.redis.proc is not None:
        pids["redis"] = cluster.redis.proc.pid
    return pids


def sample(cluster) -> dict[str, tuple[int, int]]:
    return {name: s for name, pid in cluster_pids(cluster).items()
            if (s := proc_stats(pid)) is not None}


# -- leaks ----------------------------------------------------------------------------------

async def worker_load(address: str, metadata: tuple[tuple[str, str], ...] = ()):
    """A worker's load; metadata: the cluster credential of a worker with a key."""
    from protos.slotmesh.v1 import worker_pb2, worker_pb2_grpc
    from services.rpc.plumbing import channel

    async with channel(address, metadata=metadata) as ch:
        info = await worker_pb2_grpc.WorkerStub(ch).Info(worker_pb2.InfoRequest(), timeout=5)
    return info.load


def router_streams(cluster) -> int:
    """Streams the routers are relaying now (their running-streams gauge)."""
    total = 0
    for r in cluster.routers:
        if r.metrics_address is None or r.proc.poll() is not None:
            continue
        with urllib.request.urlopen(f"http://{r.metrics_address}/metrics", timeout=5) as f:
            for line in f.read().decode().splitlines():
                if line.startswith("slotmesh_router_running_streams "):
                    total += int(float(line.split()[1]))
    return total


async def leaks(cluster, timeout_s: float = 30.0) -> dict:
    """Wait (up to timeout_s) until workers hold no KV blocks and no sequences, Redis no
    sequence records and routers no streams; return what is left (all zero = clean)."""
    from services.metadata.store import RedisStore

    store = RedisStore(cluster.redis_url)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            left = {"kv_blocks_leaked": 0, "sequences_left": 0}
            for w in cluster.workers:
                if w.proc.poll() is not None:
                    continue
                load = await worker_load(w.address, cluster.worker_credential())
                left["kv_blocks_leaked"] += load.kv_blocks_total - load.kv_blocks_free
                left["sequences_left"] += load.num_running + load.num_waiting
            left["redis_sequence_records"] = len(await store.list_sequence_ids())
            left["router_streams"] = await asyncio.to_thread(router_streams, cluster)
            if not any(left.values()) or time.monotonic() > deadline:
                return left
            await asyncio.sleep(0.2)
    finally:
        await store.close()
