"""`slotmesh bench finetune`: AdamW against SGD on one model, in one run.

Each measurement runs in a fresh child process (`python -m services.tools.bench_finetune SPEC`)
that loads the model in float32, builds the optimizer over every parameter and runs
--steps optimizer steps of the fine-tuning `Trainer` itself on --batch windows of --ctx
random tokens. The child reports its peak resident memory during the steps (weights,
gradients, optimizer state, activations and the Python/torch runtime: what a memory cap
sees) and its training tokens/s (the fastest step after the first: on a shared machine
noise only ever slows a step down). Memory children start with glibc told to map every
allocation of 64 KiB or more separately and to return freed memory at once
(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_), so RSS follows the live tensors instead
of what the allocator keeps cached, and the two optimizers are measured alike; speed
children run with glibc's defaults (and report that peak too, as
`peak_memory_bytes_plain_malloc`).

Then, per optimizer, the largest context that fits under --memory-cap-gib: a probe at
twice --ctx gives peak memory's growth per token, the line through the two points
predicts the limit, and probes of 2 steps each walk from the prediction in --ctx-step
steps until one context fits and the next does not.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from services.cli.flags import add_device_flags
from services.tools.plots import Chart, Line, Series, add_plot_flag, render

OPTIMIZER_NAMES = ("adamw", "sgd")
_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
_PROBE_STEPS = 2  # AdamW's peak comes in the second step, once its moments exist
_MAX_WALK = 6  # probes after the prediction, per optimizer


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="known name, GGUF file or HF directory (default: %(default)s)")
    p.add_argument("--ctx", type=int, default=256, help="context per window (default: 256)")
    p.add_argument("--batch", type=int, default=1, help="windows per step (default: 1)")
    p.add_argument("--steps", type=int, default=3,
                   help="steps of the speed run; tokens/s is the fastest after the first "
                        "(default: 3)")
    p.add_argument("--memory-cap-gib", type=float, default=3.0,
                   help="the cap for the largest-context search (default: %(default)s)")
    p.add_argument("--ctx-step", type=int, default=64,
                   help="granularity of the largest-context search (default: %(default)s)")
    p.add_argument("--skip-max-ctx", action="store_true", help="skip the largest-context search")
    add_device_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_plot_flag(p, "peak memory against context, per optimizer")


def add_finetune_bench_parser(bench_sub) -> None:
    p = bench_sub.add_parser("finetune", help="AdamW vs SGD: peak memory, tokens/s, "
                                              "largest context under a memory cap",
                             description=run_bench.__doc__)
    add_arguments(p)
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    """AdamW vs SGD: peak memory and tokens/s at the same batch and context, in one run,
    and the largest context each fits under a fixed memory cap."""
    from worker.loaders.hub import default_cache_dir

    spec = {"model": args.model, "cache_dir": str(args.cache_dir or default_cache_dir()),
            "batch": args.batch, "device": args.device}
    cap = int(args.memory_cap_gib * 2**30)
    report = {"model": args.model, "device": args.device, "threads": torch.get_num_threads(),
              "ctx": args.ctx, "batch": args.batch, "steps": args.steps}
    for name in OPTIMIZER_NAMES:
        base = spec | {"optimizer": name, "ctx": args.ctx}
        memory = _measure(base | {"steps": _PROBE_STEPS})
        speed = _measure(base | {"steps": args.steps}, plain_malloc=True)
        report[name] = memory | {k: speed[k] for k in ("tokens_per_s", "step_seconds")} | {
            "peak_memory_bytes_plain_malloc": speed["peak_memory_bytes"]}
    report["memory_kind"] = report["adamw"]["memory_kind"]
    report["sgd_over_adamw_peak_memory"] = round(
        report["sgd"]["peak_memory_bytes"] / report["adamw"]["peak_memory_bytes"], 3)
    report["sgd_over_adamw_tokens_per_s"] = round(
        report["sgd"]["tokens_per_s"] / report["adamw"]["tokens_per_s"], 3)
    if not args.skip_max_ctx:
        report["memory_cap_bytes"] = cap
        for name in OPTIMIZER_NAMES:
            report[name] |= _max_ctx(spec | {"optimizer": name, "steps": _PROBE_STEPS},
                                     args.ctx, report[name]["peak_memory_bytes"], cap,
                                     args.ctx_step, report[name]["max_position_embeddings"])
    print(json.dumps(report, indent=None if args.json else 2))
    if args.plot:
        render(finetune_chart(report), args.plot)
    return 0


_OPTIMIZERS = {"adamw": "AdamW", "sgd": "SGD (in backward)"}


def finetune_chart(report: dict) -> Chart:
    """Peak memory against context per optimizer (every probe the run made), the memory
    cap, and the largest context each fits under it."""
    lines, marks = [], []
    for name, label in _OPTIMIZERS.items():
        r = report[name]
        probes = r.get("probes") or {str(report["ctx"]): r["peak_memory_bytes"]}
        lines.append(Series(label=label, points=tuple(sorted(
            (float(c), b / 1e9) for c, b in probes.items()))))
        if "max_ctx_under_cap" in r:
            marks.append(Line(at=r["max_ctx_under_cap"], vertical=True,
                              label=f"{label}: {r['max_ctx_under_cap']:,}"))
    if "memory_cap_bytes" in report:
        cap = report["memory_cap_bytes"]
        marks.append(Line(at=cap / 1e9, label=f"cap {cap / 2**30:g} GiB"))
    return Chart(title=f"slotmesh bench finetune: {report['model']}",
                 note=f"batch {report['batch']}, {report['device']}, peak resident memory",
                 xlabel="context (tokens per window)", ylabel="peak memory (GB)",
                 series=tuple(lines), lines=tuple(marks))


def _max_ctx(spec: dict, ctx0: int, peak0: int, cap: int, step: int,
             limit: int) -> dict:
    """Largest multiple of `step` whose peak stays under `cap`, and the probes made."""
    probes = {ctx0: peak0}

    def fits(ctx: int) -> bool:
        if ctx not in probes:
            probes[ctx] = _measure(spec | {"ctx": ctx})["peak_memory_bytes"]
        return probes[ctx] <= cap

    ctx1 = min(limit, 2 * ctx0)
    fits(ctx1)
    per_token = max(1.0, (probes[ctx1] - peak0) / max(1, ctx1 - ctx0))
    guess = int(ctx0 + (cap - peak0) / per_token) // step * step
    ctx = min(limit // step * step, max(step, guess))
    best = 0
    if fits(ctx):  # walk up while the next one fits too
        best = ctx
        for _ in range(_MAX_WALK):
            if best + step > limit or not fits(best + step):
                break
            best += step
    else:  # walk down to the first that fits
        for _ in range(_MAX_WALK):
            ctx -= step
            if ctx < step:
                break
            if fits(ctx):
                best = ctx
                break
    return {"max_ctx_under_cap": best, "bytes_per_token": round(per_token),
            "probes": {str(c): probes[c] for c in sorted(probes)}}


def _measure(spec: dict, plain_malloc: bool = False) -> dict:
    """One child process: load, build, train `steps` steps; its JSON report.

    Memory is measured with glibc returning freed memory at once; speed with glibc as it
    is (every large free then costs an munmap and every reuse fresh page faults, which
    on two busy cores made steps several times slower).
    """
    cmd = [sys.executable, "-m", "services.tools.bench_finetune", json.dumps(spec)]
    env = os.environ if plain_malloc else os.environ | _CHILD_ENV
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"bench child failed ({spec}):\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- the child ---------------------------------------------------------------------------


def _child(spec: dict) -> dict:
    import time

    from worker.loaders import load_model_files
    from worker.models.registry import build_model
    from worker.process_memory import current_rss_bytes, release_freed_memory
    from worker.training.config import FinetuneConfig
    from worker.training.data import Windows
    from worker.training.memory import PeakMemory
    from worker.training.optim import make_optimizer, moment_buffer_bytes, state_bytes
    from worker.training.schedule import LRSchedule
    from worker.training.trainer import Trainer, TrainState

    device = torch.device(spec["device"])
    ctx, batch, steps = spec["ctx"], spec["batch"], spec["steps"]
    source = load_model_files(spec["model"], Path(spec["cache_dir"]))
    model = build_model(source.config, source.tensors, torch.float32, device)
    source.tensors.clear()
    release_freed_memory()
    rss_weights = current_rss_bytes()
    config = FinetuneConfig(model=spec["model"], data=Path("-"), out=Path("-"),
                            optimizer=spec["optimizer"], lr=1e-5, ctx=ctx, batch=batch,
                            device=spec["device"])
    params = [p.requires_grad_(True) for p in model.parameters()]
    optimizer = make_optimizer(config.optimizer, params, config.lr, 0.0)
    generator = torch.Generator().manual_seed(0)
    windows = Windows(train=torch.randint(0, model.args.vocab_size, (steps * batch, ctx + 1),
                                          generator=generator),
                      val=torch.zeros(0, ctx + 1, dtype=torch.long), num_tokens=0)
    trainer = Trainer(model=model, optimizer=optimizer, windows=windows,
                      schedule=LRSchedule.build(lr=config.lr, epochs=1), config=config,
                      state=TrainState(), stream=io.StringIO())
    memory = PeakMemory(device)
    memory.reset()
    seconds = []
    for i in range(steps):
        t0 = time.perf_counter()
        trainer.train_step(list(range(i * batch, (i + 1) * batch)))
        seconds.append(time.perf_counter() - t0)
    best = min(seconds[1:] or seconds)  # the first step also allocates; noise only adds
    return {"peak_memory_bytes": memory.peak_bytes(), "memory_kind": memory.kind,
            "weights_rss_bytes": rss_weights,
            "tokens_per_s": round(ctx * batch / best, 2),
            "step_seconds": [round(s, 3) for s in seconds],
            "optimizer_state_bytes": state_bytes(optimizer),
            "moment_buffer_bytes": moment_buffer_bytes(optimizer),
            "parameter_bytes": sum(p.numel() * p.element_size() for p in params),
            "max_position_embeddings": model.args.max_position_embeddings}


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
