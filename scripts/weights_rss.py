"""Resident memory of the real models after load, per `--weights` policy.

    .venv/bin/python -m scripts.weights_rss [--models smollm2-135m ...] [--policies none auto]

One subprocess per (model, policy), so every figure starts from a clean process: it loads
the GGUF (fetched into --cache-dir first if missing) and builds the fp32 model as the
engine does, drops the loader's tensors and trims the heap (`malloc_trim`, as the engine
does after a load), then reports the GGUF file's size, the model's weight bytes
(`weight_bytes`: parameters + packed weights), the process's RSS before the load (Python
+ torch + the worker's imports), after it, and its peak during the load. No KV cache and
no warmup: what the weights cost. Run alone: the peaks need free memory (dense
qwen2.5-1.5b peaks near 10 GB).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

MODELS = ["smollm2-135m", "gemma3-270m", "qwen2.5-0.5b", "qwen2.5-1.5b"]
MIB = 1 << 20


def measure(name: str, weights: str | None, cache_dir: Path) -> dict:
    """In this process: load + build, then the figures (bytes)."""
    import torch

    from worker.loaders import load_model_files
    from worker.models.packing import weight_bytes
    from worker.models.registry import build_model
    from worker.process_memory import current_rss_bytes, peak_rss_bytes, trim_heap

    torch.set_num_threads(1)
    base = current_rss_bytes()
    files = load_model_files(name, cache_dir, weights)
    file_bytes = Path(files.source_path).stat().st_size
    model = build_model(files.config, files.tensors, torch.float32, torch.device("cpu"),
                        weights)
    del files
    trim_heap()
    return {"model": name, "weights": weights or "none", "file_bytes": file_bytes,
            "weight_bytes": weight_bytes(model), "base_rss_bytes": base,
            "rss_bytes": current_rss_bytes(), "peak_rss_bytes": peak_rss_bytes()}


def run_one(name: str, policy: str, cache_dir: Path) -> dict:
    """`measure` in a fresh interpreter (this file's own --one mode)."""
    cmd = [sys.executable, "-m", "scripts.weights_rss", "--one", name, policy,
           "--cache-dir", str(cache_dir)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from worker.config import ModelConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--policies", nargs="*", default=["none", "auto"])
    ap.add_argument("--cache-dir", type=Path, default=ModelConfig().cache_dir)
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "POLICY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        name, policy = args.one
        print(json.dumps(measure(name, None if policy == "none" else policy, args.cache_dir)))
        return
    print("| model | weights | GGUF file | weight bytes | RSS before load | RSS after load "
          "| peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        for policy in args.policies:
            r = run_one(name, policy, args.cache_dir)
            print(f"| {name} | {r['weights']} | {r['file_bytes'] / MIB:.0f} MiB "
                  f"| {r['weight_bytes'] / MIB:.0f} MiB | {r['base_rss_bytes'] / MIB:.0f} MiB "
                  f"| {r['rss_bytes'] / MIB:.0f} MiB | {r['peak_rss_bytes'] / MIB:.0f} MiB |",
                  flush=True)


if __name__ == "__main__":
    main()
