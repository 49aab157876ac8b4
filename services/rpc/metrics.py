"""Prometheus metrics of the router and the worker, each on its own registry (several
servers can live in one process, as in tests) and served by `serve_metrics`.

Latencies are observed where a stream passes: the worker measures from the request's
arrival to its chunks, the router from the client's request to the chunks it relays.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_LENGTH_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)

# Counters show only NAME_total: the NAME_created series every counter and histogram would
# also carry doubles what dashboards scan and means nothing to rate()
disable_created_metrics()


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
    def __init__(self, load: Callable[[], object], model_name: str = "",
                 info: Mapping[str, str] | None = None) -> None:
        """`load()` returns the engine's EngineLoad; gauges and the engine's counters read
        it at scrape time. model_name labels the token counters and request histograms
        (vLLM's `model_name`); `info` becomes the labels of slotmesh_worker_info."""
        self.registry = CollectorRegistry()
        self.latency = LatencyHistograms.create(self.registry, "slotmesh_worker")
        r = self.registry
        Gauge("slotmesh_worker_info", "Always 1; the labels say what this worker serves",
              ["model_name", *sorted(info or {})], registry=r).labels(
            model_name, *(v for _k, v in sorted((info or {}).items()))).set(1)
        r.register(_EngineCounters(load, model_name))
        per_model = {"labelnames": ["model_name"], "registry": r}
        self.queue_time = Histogram(
            "slotmesh_worker_request_queue_time_seconds",
            "Request arrival to its first engine step", buckets=_TTFT_BUCKETS, **per_model
        ).labels(model_name)
        self.request_prompt_tokens = Histogram(
            "slotmesh_worker_request_prompt_tokens", "Prompt tokens per request",
            buckets=_LENGTH_BUCKETS, **per_model).labels(model_name)
        self.request_generation_tokens = Histogram(
            "slotmesh_worker_request_generation_tokens",
            "Tokens generated per request (this worker's part of it)",
            buckets=_LENGTH_BUCKETS, **per_model).labels(model_name)
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
        self.requests = Counter("slotmesh_worker_requests", "Requests by finish reason",
                                ["finish_reason"], registry=r)
        self.snapshot_bytes = Counter("slotmesh_worker_snapshot_bytes",
                                      "Snapshot bytes sent (export) and received (import)",
                                      ["direction"], registry=r)
        self.imports = Counter("slotmesh_worker_imported_sequences",
                               "Sequences imported from a peer or a file", registry=r)
        self.prompt_cache = PromptCacheMetrics.create(r)


class _EngineCounters:
    """The counters the engine keeps (monotonic over its life), read at scrape time, so
    Prometheus' rate() and increase() see a counter reset when a worker restarts."""

    def __init__(self, load: Callable[[], object], model_name: str) -> None:
        self.load, self.model_name = load, model_name

    def collect(self):
        load, model = self.load(), [self.model_name]

        def counter(name: str, doc: str, value: int, labels=(), label_values=()):
            family = CounterMetricFamily(name, doc, labels=[*labels, "model_name"])
            family.add_metric([*label_values, *model], value)
            return family

        yield counter("slotmesh_worker_prompt_tokens", "Prompt tokens of the requests "
                      "queued (cached ones included; vLLM's prompt_tokens)",
                      load.num_prompt_tokens)
        yield counter("slotmesh_worker_generation_tokens", "Tokens generated",
                      load.num_generation_tokens)
        yield counter("slotmesh_worker_num_preemptions", "Sequences preempted (their KV "
                      "given back, recomputed later)", load.num_preemptions)
        yield counter("slotmesh_worker_prefix_cache_queries_tokens",
                      "Prompt tokens looked up in the prefix cache", load.num_prefix_query_tokens)
        yield counter("slotmesh_worker_prefix_cache_hits_tokens",
                      "Prompt tokens found in the prefix cache", load.num_prefix_hit_tokens)
        saved = CounterMetricFamily("slotmesh_worker_prompt_tokens_saved",
                                    "Prompt tokens not computed thanks to a cache, by where "
                                    "the KV came from", labels=["source", "model_name"])
        saved.add_metric(["local", *model], load.num_prefix_hit_tokens - load.num_restored_tokens)
        saved.add_metric(["redis", *model], load.num_restored_tokens)
        yield saved


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
    """num_unverified: registry records skipped because they did not verify under the
    cluster key, by kind (the store's RedisStore.num_unverified)."""

    def __init__(self, num_workers: Callable[[], int],
                 num_metadata_pending: Callable[[], int] = lambda: 0,
                 num_unverified: Callable[[], Mapping[str, int]] = dict,
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
        r.register(_Count("slotmesh_router_registry_polls",
                          "Successful refreshes of the worker registry from Redis",
                          num_registry_polls))
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
        r.register(_KindCounts("slotmesh_router_unverified_records",
                               "Worker and router records in Redis ignored because they "
                               "did not verify under the cluster key (planted, altered, "
                               "moved, expired), per poll that saw them",
                               ("worker", "router"), num_unverified))


class _Count:
    """A Prometheus counter read from a count another object keeps."""

    def __init__(self, name: str, documentation: str, count: Callable[[], int]) -> None:
        self.name, self.documentation, self.count = name, documentation, count

    def collect(self):
        yield CounterMetricFamily(self.name, self.documentation, value=self.count())


class _KindCounts:
    """A Prometheus counter read from a `{kind: count}` mapping another object keeps
    (every kind in `kinds` is shown, 0 until counted)."""

    def __init__(self, name: str, documentation: str, kinds: tuple[str, ...],
                 counts: Callable[[], Mapping[str, int]]) -> None:
        self.name, self.documentation, self.kinds, self.counts = (name, documentation,
                                                                   kinds, counts)

    def collect(self):
        family = CounterMetricFamily(self.name, self.documentation, labels=["kind"])
        counts = self.counts()
        for kind in sorted({*self.kinds, *counts}):
            family.add_metric([kind], counts.get(kind, 0))
        yield family


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> tuple[object, int]:
    """Serve /metrics on host:port (0 = any free port); return (server, bound port)."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, server.server_port
