"""Prometheus metrics of the router and the worker, each on its own registry (several
servers can live in one process, as in tests) and served by `serve_metrics`.

Latencies are observed where a stream passes: the worker measures from the request's
arrival to its chunks, the router from the client's request to the chunks it relays.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


@dataclass(slots=True)
class LatencyHistograms:
    ttft: Histogram
    itl: Histogram
    e2e: Histogram

    @classmethod
    def create(cls, registry: CollectorRegistry, prefix: str) -> LatencyHistograms:
        return cls(
            ttft=Histogram(f"{prefix}_time_to_first_token_seconds",
                           "Request arrival to its first token", buckets=_TTFT_BUCKETS,
                           registry=registry),
            itl=Histogram(f"{prefix}_inter_token_latency_seconds",
                          "Time between consecutive tokens of one stream",
                          buckets=_ITL_BUCKETS, registry=registry),
            e2e=Histogram(f"{prefix}_e2e_request_latency_seconds",
                          "Request arrival to its last chunk", buckets=_E2E_BUCKETS,
                          registry=registry),
        )


@dataclass(slots=True)
class StreamTimer:
    """Observes one stream's TTFT, inter-token latencies and end-to-end latency."""

    hist: LatencyHistograms
    start: float = field(default_factory=time.perf_counter)
    last: float | None = None

    def on_tokens(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        now = time.perf_counter()
        if self.last is None:
            self.hist.ttft.observe(now - self.start)
        else:
            # a chunk of n tokens: n gaps of equal share (a step yields one per stream)
            gap = (now - self.last) / num_tokens
            for _ in range(num_tokens):
                self.hist.itl.observe(gap)
        self.last = now

    def on_finish(self) -> None:
        self.hist.e2e.observe(time.perf_counter() - self.start)


class WorkerMetrics:
    def __init__(self, load: Callable[[], object]) -> None:
        """`load()` returns the engine's EngineLoad; gauges read it at scrape time."""
        self.registry = CollectorRegistry()
        self.latency = LatencyHistograms.create(self.registry, "slotmesh_worker")
        r = self.registry
        for name, doc, attr in (
            ("slotmesh_worker_running_sequences", "Sequences in a slot", "num_running"),
            ("slotmesh_worker_waiting_sequences", "Sequences queued for a slot",
             "num_waiting"),
            ("slotmesh_worker_kv_blocks_free", "Free KV blocks (all groups)",
             "kv_blocks_free"),
            ("slotmesh_worker_kv_blocks_total", "KV blocks (all groups)", "kv_blocks_total"),
        ):
            Gauge(name, doc, registry=r).set_function(
                lambda attr=attr: getattr(load(), attr))
        Gauge("slotmesh_worker_kv_usage_ratio", "Fraction of KV blocks in use",
              registry=r).set_function(lambda: _usage(load()))
        # counters that the engine keeps; exposed as gauges of a monotonic value
        Gauge("slotmesh_worker_prefix_cache_queries_tokens",
              "Prompt tokens looked up in the prefix cache (monotonic)",
              registry=r).set_function(lambda: load().num_prefix_query_tokens)
        Gauge("slotmesh_worker_prefix_cache_hits_tokens",
              "Prompt tokens found in the prefix cache (monotonic)",
              registry=r).set_function(lambda: load().num_prefix_hit_tokens)
        self.requests = Counter("slotmesh_worker_requests", "Requests by finish reason",
                                ["finish_reason"], registry=r)
        self.snapshot_bytes = Counter("slotmesh_worker_snapshot_bytes",
                                      "Snapshot bytes sent (export) and received (import)",
                                      ["direction"], registry=r)
        self.imports = Counter("slotmesh_worker_imported_sequences",
                               "Sequences imported from a peer or a file", registry=r)
        saved = Gauge("slotmesh_worker_prompt_tokens_saved",
                      "Prompt tokens not computed thanks to a cache, by where the KV came "
                      "from (monotonic)", ["source"], registry=r)
        saved.labels("local").set_function(
            lambda: load().num_prefix_hit_tokens - load().num_restored_tokens)
        saved.labels("redis").set_function(lambda: load().num_restored_tokens)
        self.prompt_cache = PromptCacheMetrics.create(r)


@dataclass(slots=True)
class PromptCacheMetrics:
    """The worker's side of the cluster-wide prompt cache (checkpoints in Redis)."""

    writes: Counter  # result: written, exists, too_big, evicted, missing, dropped, failed
    written_bytes: Counter
    read_bytes: Counter
    lookups: Counter  # result: hit, miss, fallback
    fallbacks: Counter  # reason: unavailable, corrupt, foreign
    redis_bytes: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> PromptCacheMetrics:
        r = registry
        return cls(
            writes=Counter("slotmesh_worker_checkpoint_writes",
                           "Checkpoints offered to the cluster prompt cache, by result",
                           ["result"], registry=r),
            written_bytes=Counter("slotmesh_worker_checkpoint_written_bytes",
                                  "Bytes this worker wrote to the cluster prompt cache",
                                  registry=r),
            read_bytes=Counter("slotmesh_worker_checkpoint_read_bytes",
                               "Bytes this worker fetched from the cluster prompt cache",
                               registry=r),
            lookups=Counter("slotmesh_worker_prompt_cache_lookups",
                            "Requests that looked for a longer prefix in Redis, by result",
                            ["result"], registry=r),
            fallbacks=Counter("slotmesh_worker_prompt_cache_fallbacks",
                              "Lookups that found a checkpoint but computed the prompt "
                              "instead, by reason", ["reason"], registry=r),
            redis_bytes=Gauge("slotmesh_worker_prompt_cache_redis_bytes",
                              "Bytes of this model's prompt cache in Redis (as of this "
                              "worker's last write)", registry=r),
        )


def _usage(load) -> float:
    total = load.kv_blocks_total
    return (total - load.kv_blocks_free) / total if total else 0.0


class RouterMetrics:
    def __init__(self, num_workers: Callable[[], int],
                 num_metadata_pending: Callable[[], int] = lambda: 0,
                 num_registry_polls: Callable[[], int] = lambda: 0) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = LatencyHistograms.create(r, "slotmesh_router")
        self.routed = Counter("slotmesh_router_routed_requests", "Requests routed, per worker",
                              ["worker_id"], registry=r)
        self.prefix_queries = Counter("slotmesh_router_prefix_affinity_queries",
                                      "Routing decisions that looked up prefix owners",
                                      registry=r)
        self.prefix_hits = Counter("slotmesh_router_prefix_affinity_hits",
                                   "Routing decisions sent to a prefix's owner", registry=r)
        self.streams = Gauge("slotmesh_router_running_streams", "Streams being relayed",
                             registry=r)
        self.requests = Counter("slotmesh_router_requests", "Requests by finish reason",
                                ["finish_reason"], registry=r)
        # before the workers gauge: a scrape reads the polls first, so a poll that lands
        # mid-scrape can make it report a routable worker one poll early, never late
        Gauge("slotmesh_router_registry_polls",
              "Successful refreshes of the worker registry from Redis (monotonic)",
              registry=r).set_function(num_registry_polls)
        Gauge("slotmesh_router_workers", "Routable workers",
              registry=r).set_function(num_workers)
        Gauge("slotmesh_router_metadata_pending",
              "Sequence and prefix writes not yet in Redis (written behind; 0 = flushed)",
              registry=r).set_function(num_metadata_pending)
        self.migrations = Counter("slotmesh_router_migrations", "Migrations by result",
                                  ["result"], registry=r)
        self.migration_seconds = Histogram(
            "slotmesh_router_migration_duration_seconds",
            "Migrate call to the target's confirmation", buckets=_TTFT_BUCKETS, registry=r)
        self.migration_bytes = Counter("slotmesh_router_migration_bytes",
                                       "Snapshot bytes moved between workers (as reported "
                                       "by the target)", registry=r)
        self.failovers = Counter("slotmesh_router_failovers",
                                 "Streams continued on another worker after theirs died",
                                 registry=r)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> tuple[object, int]:
    """Serve /metrics on host:port (0 = any free port); return (server, bound port)."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, server.server_port
