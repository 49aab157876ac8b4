"""`slotmesh bench swa`: time to first token with and without the cluster-wide prompt
cache, on a sliding-window model (default gemma3-270m, window 512), in one run.

A local cluster (redis-server, router, two workers A and B) serves, per prompt length N:

- cold: a prompt of N token ids that no worker has seen, on A (A then writes its
  checkpoints: where the prompt ends and every --checkpoint-every tokens);
- warm_same: the prompt plus 16 new tokens, on A (its own prefix cache);
- warm_other: the prompt plus 16 other new tokens, on B, which never saw it: the
  sliding-window checkpoint and the full-attention blocks come from Redis.

Times are from sending the request to the first token at the client (one token asked
for), each the best of --repeats with a fresh prompt each time, after one short request
to each worker. Also reported: the bytes
of the checkpoint record (sliding-window layers only) and of the prompt's full-attention
blocks in Redis, and whether B's token equals A's for the same prompt.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from services.local.cluster import add_bench_tls_flag
from services.tools.plots import Chart, add_plot_flag, render, series

SUFFIX = 16


def add_swa_bench_parser(bench_sub, add_model_flags) -> None:
    p = bench_sub.add_parser("swa", help="prompt cache: cold vs warm TTFT, same run",
                             description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p, slots=False)
    p.set_defaults(model="gemma3-270m")
    p.add_argument("--contexts", default="2048,8192",
                   help="comma-separated prompt lengths in tokens (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per measurement, best kept (default: 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_plot_flag(p, "cold and warm time to first token against prompt length")
    add_bench_tls_flag(p)
    p.set_defaults(func=run_swa_bench)


def run_swa_bench(args: argparse.Namespace) -> int:
    from services.local.cluster import LocalCluster, bench_pki

    contexts = [int(c) for c in args.contexts.split(",")]
    ctx = max(contexts) + 2 * SUFFIX + 64
    worker_args = ["--model", args.model, "--dtype", args.dtype, "--slots", "2",
                   "--ctx", str(ctx), "--kv-cache-mb", "2048", "--prompt-cache-mb", "4096"]
    if args.cache_dir is not None:
        worker_args += ["--cache-dir", str(args.cache_dir)]
    results = {}
    with tempfile.TemporaryDirectory() as logs, LocalCluster(
            worker_args=worker_args, num_workers=2, log_dir=Path(logs),
            tls=bench_pki(args, logs)) as cluster:
        a, b = cluster.workers
        for worker in (a, b):  # one-time costs (first request, thread pools) not in "cold"
            _ttft(cluster, worker.address, _prompt(256, salt=1))
        for n in contexts:
            results[str(n)] = _measure(cluster, a, b, n, args.repeats)
    report = {
        "model": args.model, "dtype": args.dtype, "contexts": results,
        "speedup_same_worker": {n: round(r["cold_s"] / r["warm_same_s"], 1)
                                for n, r in results.items()},
        "speedup_other_worker": {n: round(r["cold_s"] / r["warm_other_s"], 1)
                                 for n, r in results.items()},
        "same_token": all(r["same_token"] for r in results.values()),
    }
    print(json.dumps(report, indent=2) if args.json else _table(report))
    if args.plot:
        render(swa_chart(report), args.plot)
    return 0


def swa_chart(report: dict) -> Chart:
    """Time to first token against prompt length: cold, warm on the same worker, warm on
    another worker (through Redis)."""
    table = report["contexts"]
    return Chart(title=f"slotmesh bench swa: {report['model']}",
                 note=f"{report['dtype']}, prompt cache in Redis",
                 xlabel="prompt tokens", ylabel="time to first token (s)",
                 series=(series("cold", table, lambda r: r["cold_s"], dashed=True),
                         series("warm, same worker", table, lambda r: r["warm_same_s"]),
                         series("warm, other worker (Redis)", table,
                                lambda r: r["warm_other_s"])),
                 logx=True, logy=True)


def _prompt(n: int, salt: int) -> list[int]:
    # arbitrary in-vocabulary ids, distinct per run so no cache has them
    return [100 + (i * 7919 + salt * 104729) % 20000 for i in range(n)]


def _measure(cluster, a, b, n: int, repeats: int) -> dict:
    best: dict[str, float] = {}
    for r in range(repeats):
        prompt = _prompt(n, salt=1000 * n + r)
        cold, token_a = _ttft(cluster, a.address, prompt)
        _wait(lambda p=prompt: _entry_bytes(cluster, p)[0] > 0,
              "A's checkpoint where the prompt ends, in Redis")
        warm_same, _ = _ttft(cluster, a.address, prompt + _prompt(SUFFIX, salt=7))
        warm_other, token_b = _ttft(cluster, b.address, prompt + _prompt(SUFFIX, salt=7))
        for key, value in (("cold_s", cold), ("warm_same_s", warm_same),
                           ("warm_other_s", warm_other)):
            best[key] = min(best.get(key, value), value)
    same_token = _ttft(cluster, b.address, prompt)[1] == token_a  # B restores at n - 16 or earlier
    checkpoint_bytes, block_bytes = _entry_bytes(cluster, prompt)
    return {**{k: round(v, 4) for k, v in best.items()}, "checkpoint_bytes": checkpoint_bytes,
            "prefix_block_bytes": block_bytes, "same_token": same_token,
            "restored_on_other": token_b is not None}


def _ttft(cluster, address: str, token_ids: list[int]) -> tuple[float, int | None]:
    from protos.slotmesh.v1 import worker_pb2_grpc
    from services.client.clients import build_request
    from services.rpc.plumbing import blocking_channel
    from services.security.cluster_auth import caller_metadata
    from worker.vocab.integrity import load_key

    key = load_key(cluster.cluster_key_file) if cluster.cluster_key_file else None
    with blocking_channel(address, tls=cluster.worker_tls(),
                          metadata=caller_metadata(key)) as ch:
        stub = worker_pb2_grpc.WorkerStub(ch)
        start = time.perf_counter()
        for msg in stub.Generate(build_request(token_ids=token_ids, max_tokens=1,
                                               temperature=0.0, ignore_eos=True),
                                 timeout=3600):
            if msg.token_ids:
                return time.perf_counter() - start, msg.token_ids[0]
    return time.perf_counter() - start, None


def _wait(condition, what: str, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _entry_bytes(cluster, prompt: list[int]) -> tuple[int, int]:
    """Sizes in Redis of the checkpoint where the prompt ends and of its blocks."""
    import redis

    from worker.vocab.block_hash import chain_hashes

    tls = cluster.redis_tls()
    r = redis.Redis.from_url(cluster.redis_url,
                             **(tls.connection_kwargs() if tls is not None else {}))
    hashes = [h.hex() for h in chain_hashes(prompt, 16)]
    checkpoint = next((r.strlen(k) for k in r.scan_iter(f"*:ckpt:{hashes[-1]}")), 0)
    blocks = sum(r.strlen(k) for h in hashes for k in r.scan_iter(f"*:blk:{h}"))
    return checkpoint, blocks


def _table(report: dict) -> str:
    lines = [f"model {report['model']} ({report['dtype']}): time to first token",
             f"{'prompt':>7} {'cold s':>8} {'same s':>8} {'other s':>8} {'same x':>7} "
             f"{'other x':>8} {'ckpt MB':>8} {'blocks MB':>9}"]
    for n, r in report["contexts"].items():
        lines.append(f"{n:>7} {r['cold_s']:8.3f} {r['warm_same_s']:8.3f} "
                     f"{r['warm_other_s']:8.3f} {report['speedup_same_worker'][n]:6.1f}x "
                     f"{report['speedup_other_worker'][n]:7.1f}x "
                     f"{r['checkpoint_bytes'] / 1e6:8.1f} {r['prefix_block_bytes'] / 1e6:9.1f}")
    lines.append(f"same_token: {report['same_token']}")
    return "\n".join(lines)
