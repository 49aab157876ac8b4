"""`slotmesh chaos`: faults and load against a real local cluster, reported as figures.

A LocalCluster is started on loopback (redis-server, one router, N workers, each its
own process), a reference run of every request is taken with no fault, and then each
scenario runs in turn:

  kill_worker     SIGKILL the worker carrying most of S concurrent streams; the router
                  replays them on the other worker. A replacement worker is added after.
  restart_redis   stop redis-server under S streams, start new streams during the outage,
                  start it again on the same port WITHOUT its data (it keeps nothing on
                  disk): registry, sequence records and prompt cache start empty.
  restart_router  SIGKILL the router under S streams and start it again on the same
                  port; clients retry on UNAVAILABLE with services.client.clients.RetryPolicy and
                  resume with the tokens they received.
  cancel_storm    C streams (default 200) started at random moments and cancelled at
                  random points (before the first token or after k tokens).
  slow_reader     streams opened by a client that never reads them, next to normal
                  streams; RSS of router and workers sampled.
  soak            constant load at the cluster's slot capacity for --soak-seconds.

Every stream is compared token for token with the reference; "data lost" (streams not
delivered exactly: missing, duplicated or wrong tokens) must be 0, and after each
scenario no KV block, worker sequence, Redis sequence record or router stream may be
left. The command exits 1 when any invariant fails, 0 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from services.client.clients import AsyncClient, RetryPolicy
from services.tools.chaos_load import (
    Outcome,
    cluster_pids,
    consume,
    gaps_s,
    leaks,
    pct_ms,
    prefix_exact,
    sample,
    score,
    timed_gaps,
)
from worker.vocab.errors import SlotmeshError

SCENARIOS = ("kill_worker", "restart_redis", "restart_router", "cancel_storm",
             "slow_reader", "soak")
FULL_SOAK_S = 1200.0
MIB = 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class ChaosConfig:
    """One chaos run. Capacity (concurrent sequences) = num_workers * slots."""

    worker_args: tuple[str, ...]  # model flags for every worker (--slots included)
    num_workers: int = 2
    slots: int = 8
    num_streams: int = 16  # concurrent streams in the fault scenarios
    max_tokens: int = 64
    num_cancels: int = 200
    num_slow_streams: int = 8
    slow_max_tokens: int = 512
    soak_s: float = 60.0
    sample_s: float = 5.0  # RSS / fd sampling period in the soak
    outage_s: float = 4.0  # Redis down (longer than the heartbeat TTL) / router down
    heartbeat_ttl_s: float = 2.0
    # the routers' sequence-record lease: a router killed on purpose leaves its records
    # this long at most, so the leak check after its scenario (30 s) sees them gone
    sequence_ttl_s: float = 10.0
    max_rss_growth_mb: float = 64.0  # per process, soak (after warm-up) and slow reader
    max_fd_growth: int = 8  # per process, soak
    seed: int = 0  # cancel points and start times of the storm
    scenarios: tuple[str, ...] = SCENARIOS
    retry: RetryPolicy = field(default_factory=lambda: RetryPolicy(
        max_attempts=40, initial_backoff_s=0.1, max_backoff_s=1.0))


class Chaos:
    """Runs the scenarios against one started LocalCluster."""

    def __init__(self, cluster, config: ChaosConfig) -> None:
        self.cluster = cluster
        self.config = config
        self.reference: dict[int, list[int]] = {}
        self.killed: set[str] = set()  # processes a scenario killed on purpose
        self._next_id = 0

    def _rid(self, scenario: str) -> str:
        self._next_id += 1
        return f"chaos-{scenario}-{self._next_id}"

    def _client(self, retry: bool = False) -> AsyncClient:
        return AsyncClient(self.cluster.router_address, timeout=600,
                           retry=self.config.retry if retry else None)

    async def run(self) -> dict:
        t0 = time.monotonic()
        await self._take_reference()
        report = {"reference_s": round(time.monotonic() - t0, 1), "scenarios": {}}
        for name in self.config.scenarios:
            start = time.monotonic()
            figures = await getattr(self, name)()
            figures["leaks_after"] = left = await leaks(self.cluster)
            figures["failures"] = _failures(name, figures) + [
                f"{k} = {v} after the scenario" for k, v in left.items() if v]
            figures["seconds"] = round(time.monotonic() - start, 1)
            report["scenarios"][name] = figures
        dead = [p.name for p in (*self.cluster.routers, *self.cluster.workers)
                if p.proc.poll() is not None and p.name not in self.killed]
        report["dead_processes"] = dead
        report["ok"] = not dead and all(not s["failures"]
                                        for s in report["scenarios"].values())
        return report

    async def _take_reference(self) -> None:
        """Every request once, no fault: what each stream must deliver."""
        async with self._client() as client:
            outs = await asyncio.gather(*(
                consume(client, Outcome(i), self.config.max_tokens, request_id=self._rid("ref"))
                for i in range(self.config.num_streams)))
        bad = [o for o in outs if not o.is_complete]
        if bad:
            raise RuntimeError(f"reference run failed: {bad[0].error or bad[0].finish_reason}")
        self.reference = {o.index: o.tokens for o in outs}

    async def _streams(self, client: AsyncClient, scenario: str, indices, **kw
                       ) -> tuple[list[Outcome], list[asyncio.Task]]:
        outs = [Outcome(i) for i in indices]
        tasks = [asyncio.create_task(consume(client, o, self.config.max_tokens,
                                             request_id=self._rid(scenario), **kw))
                 for o in outs]
        return outs, tasks

    async def _until_progress(self, outs: list[Outcome], timeout_s: float = 300.0) -> None:
        """Until half the streams have a quarter of their tokens (faults hit mid-stream)."""
        need = max(1, self.config.max_tokens // 4)
        deadline = time.monotonic() + timeout_s
        while sum(len(o.tokens) >= need for o in outs) < len(outs) // 2:
            if time.monotonic() > deadline:
                raise RuntimeError("streams made no progress")
            await asyncio.sleep(0.02)

    # -- scenarios ---------------------------------------------------------------------------

    async def kill_worker(self) -> dict:
        cfg = self.config
        async with self._client() as client:  # no client retry: the router must cope
            outs, tasks = await self._streams(client, "kill", range(cfg.num_streams))
            await self._until_progress(outs)
            counts: dict[str, int] = {}
            for o in outs:
                counts[o.worker_id] = counts.get(o.worker_id, 0) + 1
            victim = max(counts, key=counts.get)
            proc = next(w for w in self.cluster.workers if w.name == victim)
            t_kill = time.monotonic()
            proc.kill()
            self.killed.add(victim)
            await asyncio.gather(*tasks)
        figures = score(outs, self.reference)
        hit = [o for o in outs if o.worker_id == victim]
        figures.update(killed=victim, streams_on_killed=len(hit),
                       max_stall_s=_max_stall(hit, t_kill))
        await asyncio.to_thread(self.cluster.add_worker)  # back to full capacity
        await asyncio.to_thread(self.cluster.wait_for_workers, cfg.num_workers)
        return figures

    async def restart_redis(self) -> dict:
        cfg, redis = self.config, self.cluster.redis
        async with self._client(retry=True) as client:
            outs, tasks = await self._streams(client, "redis", range(cfg.num_streams))
            await self._until_progress(outs)
            await asyncio.to_thread(redis.stop)
            await asyncio.sleep(cfg.outage_s / 2)
            # new requests while Redis is down
            more, more_tasks = await self._streams(client, "redis-down",
                                                   range(cfg.num_streams // 2))
            await asyncio.sleep(cfg.outage_s / 2)
            await asyncio.to_thread(redis.start)
            recover_s = await self._until_registered()
            await asyncio.gather(*tasks, *more_tasks)
            after = await consume(client, Outcome(0), cfg.max_tokens,
                                  request_id=self._rid("redis-after"))
            retries = client.num_retries
        figures = score([*outs, *more, after], self.reference)
        figures.update(outage_s=cfg.outage_s, started_during_outage=len(more),
                       retries=retries, registry_rebuilt_s=round(recover_s, 2),
                       redis_data="not kept (restarted empty)")
        return figures

    async def _until_registered(self, timeout_s: float = 60.0) -> float:
        """Seconds until every live worker's heartbeat is in the (restarted) Redis again."""
        from services.metadata.store import RedisStore, StoreUnavailableError

        t0 = time.monotonic()
        store = RedisStore(self.cluster.redis_url, cluster_key=self.cluster.cluster_key())
        try:
            while time.monotonic() - t0 < timeout_s:
                with contextlib.suppress(StoreUnavailableError):
                    if len(await store.list_workers()) >= self.config.num_workers:
                        return time.monotonic() - t0
                await asyncio.sleep(0.05)
        finally:
            await store.close()
        raise RuntimeError("workers did not register again after Redis came back")

    async def restart_router(self) -> dict:
        cfg = self.config
        async with self._client(retry=True) as client:
            outs, tasks = await self._streams(client, "router", range(cfg.num_streams))
            await self._until_progress(outs)
            t_kill = time.monotonic()
            await asyncio.to_thread(self.cluster.kill_router, 0)
            await asyncio.sleep(cfg.outage_s / 4)
            await asyncio.to_thread(self.cluster.restart_router, 0)
            t_up = time.monotonic()
            await asyncio.gather(*tasks)
            retries = client.num_retries
        figures = score(outs, self.reference)
        figures.update(router_down_s=round(t_up - t_kill, 2), retries=retries,
                       max_stall_s=_max_stall(outs, t_kill))
        return figures

    async def cancel_storm(self) -> dict:
        cfg = self.config
        rng = random.Random(cfg.seed)
        plan = []  # (start delay, cancel after seconds | None, cancel after tokens | None)
        for _ in range(cfg.num_cancels):
            delay = rng.uniform(0, 2.0)
            if rng.random() < 0.25:
                plan.append((delay, rng.uniform(0, 0.5), None))
            else:
                plan.append((delay, None, rng.randint(1, cfg.max_tokens - 1)))
        outs = [Outcome(k % cfg.num_streams) for k in range(cfg.num_cancels)]

        async def one(client, out: Outcome, delay: float, after_s, after_tokens) -> None:
            await asyncio.sleep(delay)
            run = consume(client, out, cfg.max_tokens, request_id=self._rid("cancel"),
                          stop_after=after_tokens)
            if after_s is None:
                await run
                return
            with contextlib.suppress(TimeoutError):  # the cancel we wanted
                await asyncio.wait_for(run, after_s)

        async with self._client() as client:
            await asyncio.gather(*(one(client, o, *p) for o, p in zip(outs, plan,
                                                                       strict=True)))
            left = await leaks(self.cluster)
            after = await consume(client, Outcome(1), cfg.max_tokens,
                                  request_id=self._rid("cancel-after"))
        errors = sorted({o.error for o in outs if o.error})
        return {"cancels": len(outs),
                "before_first_token": sum(not o.tokens for o in outs),
                "mid_stream": sum(bool(o.tokens) for o in outs),
                "prefix_exact": prefix_exact(outs, self.reference),
                "errors": errors[:3], "num_errors": sum(bool(o.error) for o in outs),
                "data_lost": len(outs) - prefix_exact(outs, self.reference)
                + score([after], self.reference)["data_lost"],
                "leaks_right_after": left,
                "serving_after": score([after], self.reference)["token_exact"] == 1}

    async def slow_reader(self) -> dict:
        cfg = self.config
        n_normal = cfg.num_streams // 2
        async with self._client() as client:
            # baseline: the same load, every stream read
            base, base_tasks = await self._streams(client, "slow-base", range(n_normal))
            extra = [asyncio.create_task(consume(client, Outcome(i), cfg.slow_max_tokens,
                                                 request_id=self._rid("slow-base")))
                     for i in range(cfg.num_slow_streams)]
            await asyncio.gather(*base_tasks, *extra)
            before = sample(self.cluster)
            peak = dict(before)
            stop = asyncio.Event()
            sampler = asyncio.create_task(_sample_peak(self.cluster, peak, stop))
            slow = _SlowReader(self.cluster.router_address)
            await slow.open(cfg.num_slow_streams, cfg.slow_max_tokens, self._rid)
            unread_started = await self._until_running(cfg.num_slow_streams, timeout_s=60)
            outs, tasks = await self._streams(client, "slow", range(n_normal))
            await asyncio.gather(*tasks)
            unread_done = await self._until_generated(timeout_s=600)
            stop.set()
            await sampler
            await slow.close()
        growth = {name: round((peak[name][0] - before[name][0]) / MIB, 1)
                  for name in before if name in peak and name != "redis"}
        figures = score(outs, self.reference)
        base_p50, with_p50 = pct_ms(gaps_s(base), 50), pct_ms(gaps_s(outs), 50)
        figures.update(unread_streams=cfg.num_slow_streams, unread_started=unread_started,
                       unread_tokens_each=cfg.slow_max_tokens,
                       unread_generated=unread_done, baseline_exact=score(
                           base, self.reference)["token_exact"],
                       itl_p50_ms_all_read=base_p50, itl_p50_ms_with_unread=with_p50,
                       itl_ratio=round(with_p50 / base_p50, 2) if base_p50 else None,
                       rss_peak_growth_mb=growth)
        return figures

    async def _loads(self) -> list:
        from services.tools.chaos_load import worker_load

        credential = self.cluster.worker_credential()
        return [await worker_load(w.address, credential) for w in self.cluster.workers
                if w.proc.poll() is None]

    async def _until_running(self, count: int, timeout_s: float) -> bool:
        """Until workers hold `count` sequences (running or queued)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if sum(ld.num_running + ld.num_waiting for ld in await self._loads()) >= count:
                return True
            await asyncio.sleep(0.02)
        return False

    async def _until_generated(self, timeout_s: float) -> bool:
        """Until no worker runs a sequence (the unread streams finished generating)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            loads = await self._loads()
            if all(ld.num_running == 0 and ld.num_waiting == 0 for ld in loads):
                return True
            await asyncio.sleep(0.2)
        return False

    async def soak(self) -> dict:
        cfg = self.config
        capacity = cfg.slots * cfg.num_workers
        warmup_s = min(60.0, cfg.soak_s / 5)
        window_s = max(5.0, (cfg.soak_s - warmup_s) / 10)
        t0 = time.monotonic()
        end = t0 + cfg.soak_s
        outs: list[Outcome] = []
        samples: list[tuple[float, dict]] = []

        async def loop(client, k: int) -> None:
            while time.monotonic() < end:
                out = Outcome(k % cfg.num_streams)
                outs.append(out)
                await consume(client, out, cfg.max_tokens, request_id=self._rid("soak"))
                k += capacity

        async def sampler() -> None:
            while time.monotonic() < end:
                if time.monotonic() - t0 >= warmup_s:
                    samples.append((time.monotonic(), sample(self.cluster)))
                await asyncio.sleep(cfg.sample_s)

        async with self._client() as client:
            await asyncio.gather(sampler(), *(loop(client, k) for k in range(capacity)))
        samples.append((time.monotonic(), sample(self.cluster)))
        first, last = samples[0][1], samples[-1][1]
        timed = timed_gaps(outs)
        start_w, end_w = t0 + warmup_s, end
        figures = score(outs, self.reference)
        figures.update(
            duration_s=cfg.soak_s, warmup_s=warmup_s, concurrency=capacity,
            tokens=sum(len(o.tokens) for o in outs),
            tokens_per_s=round(sum(len(o.tokens) for o in outs) / cfg.soak_s, 1),
            itl_p99_ms_first_window=pct_ms([g for t, g in timed
                                            if start_w <= t < start_w + window_s], 99),
            itl_p99_ms_last_window=pct_ms([g for t, g in timed
                                           if end_w - window_s <= t < end_w], 99),
            window_s=round(window_s, 1),
            rss_mb={n: [round(first[n][0] / MIB, 1), round(last[n][0] / MIB, 1)]
                    for n in first if n in last},
            fds={n: [first[n][1], last[n][1]] for n in first if n in last})
        return figures


class _SlowReader:
    """A client that opens streams and never reads a message of them."""

    def __init__(self, address: str) -> None:
        from services.rpc.plumbing import channel

        self._channel = channel(address)
        self._calls = []

    async def open(self, count: int, max_tokens: int, rid) -> None:
        from protos.slotmesh.v1 import router_pb2_grpc
        from services.client.clients import build_request
        from services.tools.chaos_load import request

        stub = router_pb2_grpc.RouterStub(self._channel)
        for i in range(count):
            self._calls.append(stub.Generate(build_request(
                **request(i, max_tokens), request_id=rid("unread"))))
        await asyncio.sleep(0)  # let the calls start

    async def close(self) -> None:
        for call in self._calls:
            call.cancel()
        await self._channel.close()


async def _sample_peak(cluster, peak: dict, stop: asyncio.Event) -> None:
    while not stop.is_set():
        for name, (rss, fds) in sample(cluster).items():
            if name not in peak or rss > peak[name][0]:
                peak[name] = (rss, fds)
        await asyncio.sleep(0.25)


def _max_stall(outs: list[Outcome], t_fault: float) -> float:
    """The longest wait for a token, after the fault, of the streams given."""
    worst = 0.0
    for o in outs:
        after = [t for t in o.stamps if t > t_fault]
        before = [t for t in o.stamps if t <= t_fault]
        if after:
            worst = max(worst, after[0] - (before[-1] if before else t_fault))
    return round(worst, 2)


def _failures(name: str, f: dict) -> list[str]:
    """The invariants a scenario's figures must meet (timing is reported, not judged)."""
    out = []
    if f.get("data_lost"):
        out.append(f"data lost: {f['data_lost']} stream(s) not delivered exactly "
                   f"({f.get('errors')})")
    if name == "cancel_storm" and not f["serving_after"]:
        out.append("not serving after the storm")
    if name == "slow_reader" and not (f["unread_started"] and f["unread_generated"]):
        out.append("the unread streams did not start, or their sequences did not finish")
    return out


def _check_limits(config: ChaosConfig, report: dict) -> None:
    """Memory and descriptor bounds (need the config, so checked after the run)."""
    scenarios = report["scenarios"]
    slow = scenarios.get("slow_reader")
    if slow:
        for proc, growth in slow["rss_peak_growth_mb"].items():
            if growth > config.max_rss_growth_mb:
                slow["failures"].append(f"{proc} RSS grew {growth} MiB with unread streams "
                                        f"(limit {config.max_rss_growth_mb})")
    soak = scenarios.get("soak")
    if soak:
        for proc, (first, last) in soak["rss_mb"].items():
            if last - first > config.max_rss_growth_mb:
                soak["failures"].append(f"{proc} RSS grew {last - first:.1f} MiB in the soak "
                                        f"(limit {config.max_rss_growth_mb})")
        for proc, (first, last) in soak["fds"].items():
            if last - first > config.max_fd_growth:
                soak["failures"].append(f"{proc} holds {last - first} more file descriptors "
                                        f"(limit {config.max_fd_growth})")
    report["ok"] = report["ok"] and all(not s["failures"] for s in scenarios.values())


def run_chaos(cluster, config: ChaosConfig) -> dict:
    """Run every configured scenario on a started cluster; the report (report["ok"])."""
    report = asyncio.run(Chaos(cluster, config).run())
    _check_limits(config, report)
    report["config"] = {k: v for k, v in asdict(config).items() if k != "retry"}
    report["retry_policy"] = asdict(config.retry)
    report["pids_at_end"] = cluster_pids(cluster)
    return report


# -- the command ------------------------------------------------------------------------------

def add_chaos_parser(sub, add_model_flags) -> None:
    p = sub.add_parser("chaos", help="fault and soak scenarios on a local cluster, with "
                                     "figures; exits 1 if data is lost or anything leaks",
                       description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p, default_slots=8)
    p.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    p.add_argument("--full", action="store_true",
                   help=f"the full run: a {FULL_SOAK_S / 60:.0f}-minute soak "
                        "(unless --soak-seconds says otherwise)")
    p.add_argument("--soak-seconds", type=float, default=None,
                   help="soak duration (default: 60, or 1200 with --full)")
    p.add_argument("--streams", type=int, default=16,
                   help="concurrent streams in the fault scenarios (default: 16)")
    p.add_argument("--max-tokens", type=int, default=64,
                   help="tokens per stream (default: 64)")
    p.add_argument("--cancels", type=int, default=200,
                   help="streams in the cancellation storm (default: 200)")
    p.add_argument("--slow-streams", type=int, default=8,
                   help="streams the slow reader opens and never reads (default: 8)")
    p.add_argument("--slow-max-tokens", type=int, default=512,
                   help="tokens each unread stream generates (default: 512)")
    p.add_argument("--max-rss-growth-mb", type=float, default=64.0,
                   help="per-process RSS growth allowed in the soak (after warm-up) and "
                        "with unread streams (default: 64)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help="comma-separated subset, run in this order (default: all)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the storm's start times and cancel points (default: 0)")
    p.add_argument("--log-dir", type=Path, default=None,
                   help="keep each process's log in DIR/NAME.log (default: a temporary "
                        "directory, removed)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=cmd_chaos)


def config_from_args(args: argparse.Namespace) -> ChaosConfig:
    from services.local.cluster import model_worker_args

    scenarios = tuple(s for s in args.scenarios.split(",") if s)
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown:
        raise SlotmeshError(f"--scenarios: unknown {unknown}; known: {', '.join(SCENARIOS)}")
    if args.workers < 2:
        raise SlotmeshError("--workers: at least 2 (a worker is killed under load)")
    soak_s = args.soak_seconds or (FULL_SOAK_S if args.full else 60.0)
    worker_args = [*model_worker_args(args), "--kv-cache-mb", str(args.kv_cache_mb)]
    return ChaosConfig(worker_args=tuple(worker_args), num_workers=args.workers,
                       slots=args.slots, num_streams=args.streams, max_tokens=args.max_tokens,
                       num_cancels=args.cancels, num_slow_streams=args.slow_streams,
                       slow_max_tokens=args.slow_max_tokens, soak_s=soak_s,
                       max_rss_growth_mb=args.max_rss_growth_mb, seed=args.seed,
                       scenarios=scenarios)


def start_cluster(config: ChaosConfig, log_dir: Path):
    """The LocalCluster the scenarios run on (started); the caller stops it."""
    from services.local.cluster import LocalCluster, write_key_file

    key = write_key_file(log_dir / "cluster.key")
    return LocalCluster(worker_args=list(config.worker_args), num_workers=config.num_workers,
                        heartbeat_ttl_s=config.heartbeat_ttl_s, registry_poll_s=0.25,
                        metrics=True, log_dir=log_dir, cluster_key_file=key,
                        router_args=["--sequence-ttl", str(config.sequence_ttl_s)]).start()


def cmd_chaos(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    with tempfile.TemporaryDirectory(prefix="slotmesh-chaos-") as tmp:
        log_dir = args.log_dir or Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        started = time.time()
        cluster = start_cluster(config, log_dir)
        try:
            report = run_chaos(cluster, config)
        finally:
            cluster.stop()
    report["model"] = args.model
    report["started_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started))
    report["wall_s"] = round(time.time() - started, 1)
    print(json.dumps(report, indent=2) if args.json else format_report(report), flush=True)
    return 0 if report["ok"] else 1


_SHOWN = {  # the figures of each scenario the table shows, in order
    "kill_worker": ("streams", "completed", "token_exact", "lost_tokens",
                    "duplicated_tokens", "streams_on_killed", "max_stall_s"),
    "restart_redis": ("streams", "completed", "token_exact", "lost_tokens",
                      "duplicated_tokens", "started_during_outage", "retries",
                      "registry_rebuilt_s"),
    "restart_router": ("streams", "completed", "token_exact", "lost_tokens",
                       "duplicated_tokens", "retries", "router_down_s", "max_stall_s"),
    "cancel_storm": ("cancels", "before_first_token", "mid_stream", "prefix_exact",
                     "num_errors", "serving_after"),
    "slow_reader": ("streams", "token_exact", "unread_streams", "unread_started",
                    "unread_generated",
                    "itl_p50_ms_all_read", "itl_p50_ms_with_unread", "rss_peak_growth_mb"),
    "soak": ("duration_s", "concurrency", "streams", "token_exact", "tokens_per_s",
             "itl_p99_ms_first_window", "itl_p99_ms_last_window", "rss_mb", "fds"),
}


def format_report(report: dict) -> str:
    lines = [f"slotmesh chaos: {report.get('model')}, started {report.get('started_utc')} "
             f"UTC, {report.get('wall_s')} s"]
    for name, f in report["scenarios"].items():
        verdict = "ok" if not f["failures"] else "FAILED"
        lines.append(f"\n{name} ({f['seconds']} s): {verdict}, data lost {f['data_lost']}")
        for key in _SHOWN.get(name, ()):
            if key in f:
                lines.append(f"  {key:<26} {f[key]}")
        leaks_after = ", ".join(f"{k}={v}" for k, v in f["leaks_after"].items())
        lines.append(f"  {'left after':<26} {leaks_after}")
        lines += [f"  FAILED: {msg}" for msg in f["failures"]]
    if report["dead_processes"]:
        lines.append(f"\nprocesses that died: {report['dead_processes']}")
    lines.append(f"\n{'all invariants hold' if report['ok'] else 'INVARIANTS FAILED'}")
    return "\n".join(lines)
