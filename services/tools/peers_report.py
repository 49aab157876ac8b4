"""The `bench peers` report: the issue's table (tokens/s per concurrency, TTFT p50 at the
highest, ratios to transformers fp32 and to the best peer), the same as one JSON object,
and the CPU line (model, SIMD/matrix flags read at run time, torch's capability).

"Best peer" at a concurrency is the fastest row that is not slotmesh and ran there
(transformers included, so there is one even when no HTTP peer is installed).
"""

from __future__ import annotations

import datetime
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

from services.tools.peers_workload import RunResult, Workload

_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
              "amx_int8", "avx_vnni")


@dataclass(slots=True, kw_only=True)
class Row:
    """One system's line: its median result per concurrency, or why it did not run."""

    name: str
    kind: str  # "slotmesh" | "baseline" | "peer"
    detail: str = ""
    not_run: str | None = None
    results: dict[int, RunResult] = field(default_factory=dict)


def cpu_info(cpuinfo: str | None = None) -> dict:
    """The CPU's model name and the SIMD/matrix flags that decide kernel speed, read at run
    time (/proc/cpuinfo on Linux), with torch's view of it."""
    import torch

    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name") or platform.processor() or "unknown",
            "cores": os.cpu_count(), "flags": [f for f in _CPU_FLAGS if f in flags],
            "native_bf16": bool(flags & {"avx512_bf16", "amx_bf16"}),
            "torch": torch.__version__,
            "torch_capability": torch.backends.cpu.get_cpu_capability()}


def cpu_line(cpu: dict) -> str:
    flags = " ".join(f.upper() for f in cpu["flags"]) or "no AVX2"
    bf16 = "native bf16" if cpu["native_bf16"] else "no native bf16"
    return (f"{cpu['model']}, {cpu['cores']} cores, {flags} ({bf16}); torch {cpu['torch']} "
            f"(capability {cpu['torch_capability']})")


def build_report(model_name: str, workload: Workload, rows: list[Row], threads: int,
                 loadavg: tuple[tuple[float, ...], tuple[float, ...]]) -> dict:
    """loadavg: os.getloadavg() before and after the run (other jobs on the cores show
    there: a shared machine's figures are noise)."""
    levels = workload.levels
    baseline = next((r for r in rows if r.kind == "baseline" and r.results), None)
    best_peer = {}
    for c in levels:
        ran = [r for r in rows if r.kind != "slotmesh" and c in r.results]
        if ran:
            best_peer[c] = max(ran, key=lambda r: r.results[c].tokens_per_s)
    out_rows = []
    for r in rows:
        entry = {"name": r.name, "kind": r.kind, "detail": r.detail, "not_run": r.not_run}
        if r.results:
            entry |= {
                "tokens_per_s": {str(c): round(r.results[c].tokens_per_s, 2) for c in levels},
                "ttft_p50_s": {str(c): round(r.results[c].ttft_p50_s, 3) for c in levels},
                "min_tokens": min(r.results[c].min_tokens for c in levels),
                "vs_transformers": _ratios(r, baseline, levels),
                "vs_best_peer": {str(c): round(r.results[c].tokens_per_s /
                                               best_peer[c].results[c].tokens_per_s, 3)
                                 for c in levels if c in best_peer},
            }
        out_rows.append(entry)
    return {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "model": model_name, "cpu": cpu_info(), "threads": threads,
            "loadavg": {"before": [round(x, 2) for x in loadavg[0]],
                        "after": [round(x, 2) for x in loadavg[1]]},
            "workload": asdict(workload),
            "rows": out_rows,
            "best_peer": {str(c): r.name for c, r in best_peer.items()}}


def _ratios(row: Row, baseline: Row | None, levels) -> dict:
    if baseline is None:
        return {}
    return {str(c): round(row.results[c].tokens_per_s / baseline.results[c].tokens_per_s, 3)
            for c in levels}


def format_report(report: dict) -> str:
    """The issue's table in markdown, then the rows that did not run and the CPU line."""
    levels = [str(c) for c in report["workload"]["levels"]]
    top = levels[-1]
    head = (["system"] + [f"c={c} tok/s" for c in levels] + [f"TTFT p50 at c={top}",
            f"× transformers fp32 ({'/'.join(levels)})", f"× best peer ({'/'.join(levels)})"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for r in report["rows"]:
        if r["not_run"] is not None:
            cells = ["not run"] + ["—"] * (len(head) - 2)
            notes.append(f"- {r['name']}: not run ({r['not_run']})")
        else:
            cells = ([f"{r['tokens_per_s'][c]:.1f}" for c in levels]
                     + [f"{r['ttft_p50_s'][top]:.2f} s",
                        " / ".join(f"{r['vs_transformers'][c]:.2f}×" for c in levels
                                   if c in r["vs_transformers"]) or "—",
                        " / ".join(f"{r['vs_best_peer'][c]:.2f}×" for c in levels
                                   if c in r["vs_best_peer"]) or "—"])
            if r["min_tokens"] < report["workload"]["new_tokens"]:
                notes.append(f"- {r['name']}: some requests got only {r['min_tokens']} tokens")
        lines.append("| " + " | ".join([r["name"], *cells]) + " |")
    w = report["workload"]
    lines += ["", *notes, "",
              f"{report['model']}: {w['prompt_tokens']}-token prompts + {w['new_tokens']} "
              f"greedy tokens (EOS ignored), requests per client per run: {w['rounds']}, median of "
              f"{w['repeat']}; best peer: " + ", ".join(f"c={c} {n}" for c, n in
                                                        report["best_peer"].items()),
              f"CPU: {cpu_line(report['cpu'])}; threads per system: {report['threads']}",
              f"load average (1/5/15 min) before {report['loadavg']['before']}, after "
              f"{report['loadavg']['after']}", f"date: {report['date']}"]
    lines += [f"- {r['name']}: {r['detail']}" for r in report["rows"] if r["detail"]]
    return "\n".join(lines)
