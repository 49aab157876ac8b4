"""`slotmesh bench migration`: moving a running sequence by snapshot against moving it by
replay (the target recomputes the KV), at several context lengths, in one run.

A local cluster (redis-server, router, two workers) serves one greedy stream per context
length: a prompt of N token ids and --new-tokens more. The same request runs three
times: never moved (the reference, and the normal inter-token latency), moved by FULL
snapshot after --migrate-at tokens, and moved as TOKENS_ONLY (replay). Reported per N:

- migrate_s: from the Migrate call to the first token the client gets from the target
  (transfer + install + one step for a snapshot; re-prefill + one step for replay);
- snapshot_bytes: what the target pulled from the source;
- pause_ms: the longest gap between two tokens the client saw around the migration,
  next to the median gap of the unmigrated run, and whether it is within the target
  (two normal gaps plus the transfer: Migrate call to the target's confirmation);
- token_exact: both moved streams equal the reference.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from services.local.cluster import add_bench_tls_flag
from services.tools.plots import Chart, add_plot_flag, render, series


def add_migration_bench_parser(bench_sub, add_model_flags) -> None:
    p = bench_sub.add_parser("migration", help="snapshot vs replay migration, same run",
                             description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p, slots=False)
    p.set_defaults(model="qwen2.5-0.5b")
    p.add_argument("--contexts", default="256,1024,4096",
                   help="comma-separated prompt lengths in tokens (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--migrate-at", type=int, default=8,
                   help="move the sequence after this many tokens (default: 8)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_plot_flag(p, "migration time against context length")
    add_bench_tls_flag(p)
    p.set_defaults(func=run_migration_bench)


def run_migration_bench(args: argparse.Namespace) -> int:
    from services.client.clients import Client
    from services.local.cluster import LocalCluster, bench_pki

    contexts = [int(c) for c in args.contexts.split(",")]
    ctx = max(contexts) + args.new_tokens + 64
    # no prompt cache: replay must recompute, not restore from Redis (bench swa does that)
    worker_args = ["--model", args.model, "--dtype", args.dtype, "--slots", "2",
                   "--ctx", str(ctx), "--kv-cache-mb", "2048", "--prompt-cache-mb", "0"]
    if args.cache_dir is not None:
        worker_args += ["--cache-dir", str(args.cache_dir)]
    results = {}
    with tempfile.TemporaryDirectory() as logs, LocalCluster(
            worker_args=worker_args, num_workers=2, log_dir=Path(logs),
            tls=bench_pki(args, logs)) as cluster, \
            Client(cluster.router_address, timeout=3600,
                   tls=cluster.client_tls()) as client:
        for n in contexts:
            results[str(n)] = _measure(client, n, args)
    report = {
        "model": args.model, "new_tokens": args.new_tokens, "migrate_at": args.migrate_at,
        "contexts": results,
        "snapshot_speedup_over_replay": {
            n: round(r["replay"]["migrate_s"] / r["snapshot"]["migrate_s"], 2)
            for n, r in results.items()},
        "token_exact": all(r["snapshot"]["token_exact"] and r["replay"]["token_exact"]
                           for r in results.values()),
    }
    print(json.dumps(report, indent=2) if args.json else _table(report))
    if args.plot:
        render(migration_chart([report]), args.plot)
    return 0


def migration_chart(reports: list[dict]) -> Chart:
    """Migration time (Migrate call → first token from the target) against context, by
    snapshot and by replay; several reports (models) share the axes."""
    lines = []
    for report in reports:
        model = f" ({report['model']})" if len(reports) > 1 else ""
        lines += [series(f"snapshot{model}", report["contexts"],
                         lambda r: r["snapshot"]["migrate_s"]),
                  series(f"replay{model}", report["contexts"],
                         lambda r: r["replay"]["migrate_s"], dashed=True)]
    models = ", ".join(r["model"] for r in reports)
    return Chart(title=f"slotmesh bench migration: {models}",
                 note=f"moved after {reports[0]['migrate_at']} of "
                      f"{reports[0]['new_tokens']} new tokens",
                 xlabel="context (prompt tokens)", ylabel="migration time (s)",
                 series=tuple(lines), logx=True, logy=True)


def _prompt(n: int, salt: int) -> list[int]:
    # arbitrary in-vocabulary ids: timing and exactness do not depend on the text
    return [100 + (i * 7919 + salt * 104729) % 20000 for i in range(n)]


def _measure(client, n: int, args) -> dict:
    """Each side gets its own prompt, so the target never has it in its prefix cache
    (replay would otherwise be a cache hit); each has its own unmigrated reference, which
    prefix affinity places on the worker the migrated run then starts on."""
    out = {}
    for salt, (label, kind) in enumerate((("snapshot", "full"), ("replay", "tokens_only"))):
        request = {"token_ids": _prompt(n, salt), "max_tokens": args.new_tokens,
                   "temperature": 0.0, "ignore_eos": True}
        ref_tokens, ref_times = _stream(client, request, f"ref-{label}-{n}", None, None)
        gaps = [b - a for a, b in itertools.pairwise(ref_times)]
        normal_itl = statistics.median(gaps) if gaps else 0.0
        moved: dict = {}
        tokens, times = _stream(client, request, f"{label}-{n}", kind, moved, args.migrate_at)
        first_target = moved["first_target_time"]
        window = [t for t in times if moved["start"] - 1 <= t <= first_target + 1]
        pause = max((b - a for a, b in itertools.pairwise(window)), default=0.0)
        transfer = moved["result"].duration_s  # Migrate call → target confirmed
        out[label] = {
            "migrate_s": round(first_target - moved["start"], 4),
            "transfer_s": round(transfer, 4),
            "snapshot_bytes": moved["result"].snapshot_bytes,
            "normal_itl_ms": round(normal_itl * 1000, 1),
            "pause_ms": round(pause * 1000, 1),
            # target: the pause is at most two normal gaps plus the transfer itself
            "pause_within_target": pause <= 2 * normal_itl + transfer,
            "token_exact": tokens == ref_tokens,
        }
    return out


def _stream(client, request: dict, request_id: str, kind: str | None, moved: dict | None,
            migrate_at: int = 0) -> tuple[list[int], list[float]]:
    tokens, times = [], []
    mover: threading.Thread | None = None
    for chunk in client.stream(request_id=request_id, **request):
        now = time.perf_counter()
        if kind is not None and mover is not None and chunk.worker_id \
                and "first_target_time" not in moved:
            moved["first_target_time"] = now
        tokens.extend(chunk.token_ids)
        times.extend([now] * len(chunk.token_ids))
        if kind is not None and mover is None and len(tokens) >= migrate_at:
            moved["start"] = time.perf_counter()

            def move() -> None:
                moved["result"] = client.migrate(request_id, kind=kind)

            mover = threading.Thread(target=move)
            mover.start()
    if mover is not None:
        mover.join()
    return tokens, times


def _table(report: dict) -> str:
    lines = [f"model {report['model']}: migrate after {report['migrate_at']} of "
             f"{report['new_tokens']} new tokens",
             f"{'context':>8} {'snapshot s':>10} {'replay s':>9} {'speedup':>8} {'MB':>8} "
             f"{'pause ms':>9} {'normal ITL':>10}"]
    for n, r in report["contexts"].items():
        s, p = r["snapshot"], r["replay"]
        lines.append(f"{n:>8} {s['migrate_s']:10.3f} {p['migrate_s']:9.3f} "
                     f"{report['snapshot_speedup_over_replay'][n]:7.1f}x "
                     f"{s['snapshot_bytes'] / 1e6:8.1f} {s['pause_ms']:9.1f} "
                     f"{s['normal_itl_ms']:9.1f}")
    lines.append(f"token_exact: {report['token_exact']}")
    return "\n".join(lines)
