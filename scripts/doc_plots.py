"""Draw the figures in docs/figures/ from the numbers recorded in docs/benchmarks.md.

    .venv/bin/python -m scripts.doc_plots            # rewrites docs/figures/bench-*.png

Re-running the benchmarks costs an hour of CPU, so the reports below are the recorded
tables of docs/benchmarks.md written in each bench's JSON shape (only the fields its
chart reads), and each goes through the same chart function as `slotmesh bench …
--plot FILE.png`. A new measurement updates the table and the report here together.
Needs the `plot` extra (matplotlib).
"""

from __future__ import annotations

import sys
from pathlib import Path

from services.tools.bench_cluster import cluster_chart
from services.tools.bench_engine import engine_chart
from services.tools.bench_finetune import finetune_chart
from services.tools.bench_migration import migration_chart
from services.tools.bench_swa import swa_chart
from services.tools.plots import render

FIGURES = Path(__file__).resolve().parent.parent / "docs" / "figures"


def _tok_s(**levels: float) -> dict:
    return {level.removeprefix("c"): {"tokens_per_s": v} for level, v in levels.items()}


# docs/benchmarks.md, "Results on the dev machine (2026-11-28 …)": fp32, --repeat 2
ENGINE_FP32 = {"model": "smollm2-135m", "dtype": "float32", "weights": "dense", "threads": 2,
               "prompt_tokens": 128, "new_tokens": 128,
               "slotmesh": _tok_s(c1=15.1, c4=56.7, c16=82.3),
               "transformers": _tok_s(c1=13.0, c4=33.1, c16=68.8)}
# "Packed weights (`--weights auto`) … (2026-12-02)": the `auto` run and its transformers
ENGINE_AUTO = ENGINE_FP32 | {"weights": "auto",
                             "slotmesh": _tok_s(c1=17.7, c4=61.5, c16=80.4),
                             "transformers": _tok_s(c1=9.9, c4=25.5, c16=102.5)}
# "`slotmesh bench cluster`", measured 2026-11-28
CLUSTER = {"model": "smollm2-135m", "new_tokens": 64, "repeat": 2, "cpu_count": 2,
           "one_worker": {c: {"direct": {"tokens_per_s": d}, "router": {"tokens_per_s": r}}
                          for c, d, r in (("1", 11.1, 12.2), ("4", 41.4, 40.9),
                                          ("16", 76.4, 74.6))},
           "two_workers": {"16": {"tokens_per_s": 72.2}}}


def _migration(model: str, snapshot: tuple, replay: tuple) -> dict:
    return {"model": model, "migrate_at": 8, "new_tokens": 32,
            "contexts": {str(n): {"snapshot": {"migrate_s": s}, "replay": {"migrate_s": r}}
                         for n, s, r in zip((256, 1024, 4096), snapshot, replay,
                                            strict=True)}}


# "`slotmesh bench migration`", measured 2026-11-28
MIGRATION = [_migration("qwen2.5-0.5b", (0.44, 0.50, 1.12), (2.61, 6.41, 27.87)),
             _migration("smollm2-135m", (0.29, 0.48, 1.14), (0.97, 2.53, 14.34))]
# "`slotmesh bench swa`", measured 2026-11-28, best of 2
SWA = {"model": "gemma3-270m", "dtype": "float32", "contexts": {
    "2048": {"cold_s": 5.82, "warm_same_s": 0.207, "warm_other_s": 0.375},
    "8192": {"cold_s": 27.30, "warm_same_s": 0.199, "warm_other_s": 0.607}}}


def _finetune_probes(peak_256: float, bytes_per_token: float) -> dict:
    """The two probes the recorded figures give: the peak at ctx 256 and the one at 512
    (twice --ctx) that the growth per token was measured from."""
    return {"256": peak_256, "512": peak_256 + 256 * bytes_per_token}


# "`slotmesh bench finetune`" (2026-11-28): peak at ctx 256, growth per token, largest ctx
FINETUNE = {"model": "smollm2-135m", "ctx": 256, "batch": 1, "device": "cpu",
            "memory_cap_bytes": 3 * 2**30,
            "adamw": {"peak_memory_bytes": 2.84e9, "max_ctx_under_cap": 512,
                      "probes": _finetune_probes(2.84e9, 0.98e6)},
            "sgd": {"peak_memory_bytes": 1.51e9, "max_ctx_under_cap": 1088,
                    "probes": _finetune_probes(1.51e9, 1.98e6)}}

CHARTS = {
    "bench-engine-fp32.png": lambda: engine_chart(ENGINE_FP32),
    "bench-engine-auto.png": lambda: engine_chart(ENGINE_AUTO),
    "bench-cluster.png": lambda: cluster_chart(CLUSTER),
    "bench-migration.png": lambda: migration_chart(MIGRATION),
    "bench-swa.png": lambda: swa_chart(SWA),
    "bench-finetune.png": lambda: finetune_chart(FINETUNE),
}


def main() -> int:
    for name, chart in CHARTS.items():
        print(render(chart(), FIGURES / name).relative_to(FIGURES.parent.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
