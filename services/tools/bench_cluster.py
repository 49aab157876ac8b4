"""`slotmesh bench cluster`: streams through the router against the same streams sent
straight to one worker, in one run, then the router with two workers. With --http, the
same streams through the OpenAI-compatible gateway too (`POST /v1/completions`, SSE, a
plain asyncio HTTP client so no client library's cost is measured), alternating with
the other two sides.

A real local cluster is started (redis-server, router, workers as processes). For each
concurrency the direct and routed runs alternate and the best of --repeat is kept, so
machine noise hits both sides alike. Every stream is greedy with ignore_eos, so each
produces exactly --new-tokens tokens. Reported per side: aggregate tokens/s (all tokens
/ wall time), and p50/p99 of time to first token and of inter-token latency as the
client sees them.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from services.local.cluster import add_bench_tls_flag
from services.tools.plots import Chart, add_plot_flag, render, series

_TEXT = ("Distributed systems trade one kind of difficulty for another: a single machine "
         "fails all at once, a cluster fails a little at a time, and most of the work of "
         "building one goes into noticing, containing and recovering from those partial "
         "failures without the user seeing them. ")


@dataclass(frozen=True, slots=True)
class LoadResult:
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float


def add_cluster_bench_parser(bench_sub, add_model_flags) -> None:
    p = bench_sub.add_parser("cluster", help="router vs direct-to-worker, and 2 workers vs 1",
                             description=__doc__)
    add_model_flags(p, slots=False)
    p.add_argument("--concurrency", default="1,4,16",
                   help="comma-separated concurrent streams (default: %(default)s)")
    p.add_argument("--prompt-words", type=int, default=48,
                   help="words of text in each prompt (default: 48)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=2,
                   help="runs per side and concurrency, alternating; best kept (default: 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_bench_tls_flag(p)
    add_plot_flag(p, "tokens/s against concurrent streams")
    p.add_argument("--http", action="store_true",
                   help="also measure the HTTP gateway path (gateway → router → worker)")
    p.set_defaults(func=run_cluster_bench)


def run_cluster_bench(args: argparse.Namespace) -> int:
    from services.local.cluster import LocalCluster, bench_pki

    levels = [int(c) for c in args.concurrency.split(",")]
    worker_args = ["--model", args.model, "--dtype", args.dtype, "--slots", str(max(levels))]
    if args.cache_dir is not None:
        worker_args += ["--cache-dir", str(args.cache_dir)]
    if args.ctx is not None:
        worker_args += ["--ctx", str(args.ctx)]
    with tempfile.TemporaryDirectory() as logs, LocalCluster(
            worker_args=worker_args, num_workers=1, log_dir=Path(logs),
            tls=bench_pki(args, logs), http_port=0 if args.http else None) as cluster:
        report = asyncio.run(_measure(cluster, args, levels))
    report["model"] = args.model
    report["tls"] = args.tls
    report["cpu_count"] = os.cpu_count()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    if args.plot:
        render(cluster_chart(report), args.plot)
    return 0


def cluster_chart(report: dict) -> Chart:
    """Aggregate tokens/s against concurrent streams: straight to the worker, through the
    router, and through the router to two workers."""
    one = report["one_worker"]
    return Chart(title=f"slotmesh bench cluster: {report['model']}",
                 note=f"{report['new_tokens']} new tokens per stream, best of "
                      f"{report['repeat']}, {report['cpu_count']} CPUs"
                      + (", TLS" if report.get("tls") else ""),
                 xlabel="concurrent streams", ylabel="generated tokens/s",
                 series=(series("direct to the worker", one,
                                lambda r: r["direct"]["tokens_per_s"], dashed=True),
                         series("through the router", one,
                                lambda r: r["router"]["tokens_per_s"]),
                         series("through the router, 2 workers", report["two_workers"],
                                lambda r: r["tokens_per_s"])),
                 logx=True)


async def _measure(cluster, args, levels: list[int]) -> dict:
    prompts = [f"{i}. " + " ".join((_TEXT * 8).split()[: args.prompt_words])
               for i in range(max(levels))]
    router, direct = cluster.router_address, cluster.workers[0].address
    tls = {"router": cluster.client_tls(), "worker": cluster.worker_tls()}
    sides = [("direct", direct, "worker"), ("router", router, "router")]
    if cluster.gateway is not None:
        tls["http"] = cluster.tls.ca if cluster.tls else None
        sides.append(("gateway", cluster.gateway.address, "http"))
    one = {}
    for c in levels:
        best: dict[str, LoadResult] = {}
        for _side, address, service in sides:  # warm every path at this batch size
            await _load_side(address, service, tls[service], prompts[:c], 4)
        for _ in range(args.repeat):
            for side, address, service in sides:
                r = await _load_side(address, service, tls[service], prompts[:c],
                                     args.new_tokens)
                if side not in best or r.tokens_per_s > best[side].tokens_per_s:
                    best[side] = r
        one[str(c)] = {side: asdict(r) for side, r in best.items()}
    await asyncio.to_thread(cluster.add_worker)
    await asyncio.to_thread(cluster.wait_for_workers, 2)
    top = max(levels)
    gateway = {}
    if cluster.gateway is not None:
        gateway = {"gateway_over_router": {
            c: {"tokens_per_s": round(v["gateway"]["tokens_per_s"]
                                      / v["router"]["tokens_per_s"], 3),
                "ttft_p50": round(v["gateway"]["ttft_p50_ms"] / v["router"]["ttft_p50_ms"], 3)}
            for c, v in one.items()}}
    two = max([await _load(router, "router", tls["router"], prompts[:top], args.new_tokens)
               for _ in range(args.repeat)], key=lambda r: r.tokens_per_s)
    return {
        "new_tokens": args.new_tokens, "repeat": args.repeat, "one_worker": one,
        "router_over_direct": {c: round(v["router"]["tokens_per_s"]
                                        / v["direct"]["tokens_per_s"], 3)
                               for c, v in one.items()},
        "two_workers": {str(top): asdict(two)},
        "two_workers_over_one": round(two.tokens_per_s
                                      / one[str(top)]["router"]["tokens_per_s"], 3),
        **gateway,
    }


async def _load_side(address: str, service: str, tls, prompts: list[str], new_tokens: int
                     ) -> LoadResult:
    if service == "http":
        from services.tools.bench_http import load_http

        ttfts, gaps, count, wall = await load_http(address, tls, prompts, new_tokens)
        return _result(ttfts, gaps, count, wall)
    return await _load(address, service, tls, prompts, new_tokens)


async def _load(address: str, service: str, tls, prompts: list[str], new_tokens: int
                ) -> LoadResult:
    from services.client.clients import AsyncClient

    async with AsyncClient(address, service=service, timeout=600,
                           tls=tls) as client:
        async def one(prompt: str) -> tuple[float, list[float], int]:
            start = time.perf_counter()
            stamps = []
            count = 0
            async for chunk in client.stream(text=prompt, max_tokens=new_tokens,
                                             temperature=0, ignore_eos=True):
                if chunk.token_ids:
                    stamps.append(time.perf_counter())
                    count += len(chunk.token_ids)
            gaps = [b - a for a, b in itertools.pairwise(stamps)]
            return stamps[0] - start, gaps, count

        start = time.perf_counter()
        results = await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - start
    return _result([r[0] for r in results], [g for r in results for g in r[1]],
                   sum(r[2] for r in results), wall)


def _result(ttfts: list[float], gaps: list[float], num_tokens: int, wall: float
            ) -> LoadResult:
    return LoadResult(
        tokens_per_s=round(num_tokens / wall, 2),
        ttft_p50_ms=_ms(_pct(ttfts, 50)), ttft_p99_ms=_ms(_pct(ttfts, 99)),
        itl_p50_ms=_ms(_pct(gaps, 50)), itl_p99_ms=_ms(_pct(gaps, 99)))


def _pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _print(report: dict) -> None:
    print(f"model {report['model']}, {report['new_tokens']} new tokens per stream, "
          f"best of {report['repeat']}, {report['cpu_count']} CPUs")
    print(f"{'streams':>8} {'side':>7} {'tok/s':>8} {'TTFT p50':>9} {'p99':>8} "
          f"{'ITL p50':>8} {'p99':>8}")
    for c, sides in report["one_worker"].items():
        for side, r in sides.items():
            print(f"{c:>8} {side:>7} {r['tokens_per_s']:8.1f} {r['ttft_p50_ms']:8.1f}ms "
                  f"{r['ttft_p99_ms']:6.1f}ms {r['itl_p50_ms']:6.1f}ms {r['itl_p99_ms']:6.1f}ms")
    print("router / direct:", report["router_over_direct"])
    print("2 workers / 1 worker (router):", report["two_workers_over_one"])
    if "gateway_over_router" in report:
        print("gateway / router:", report["gateway_over_router"])
