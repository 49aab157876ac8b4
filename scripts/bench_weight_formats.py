"""Indicative microbenchmark of the weight formats on a model's linear shapes.

    .venv/bin/python -m scripts.bench_weight_formats [--model smollm2-135m] [--threads 1]
        [--reps 7] [--distinct --formats "fp32 F.linear" "int8 bf16-act" ...]

Every format runs interleaved in the same process (one round = each format once, per
shape and M), median of `reps` rounds; the table gives ms per call and the ratio to fp32
`F.linear`, and a "step" row sums one decode step's linears (per layer fused qkv, o_proj,
fused gate_up, down, plus the lm_head) from the per-shape times. One weight per shape is
called again and again, so a small one stays in the CPU caches; --distinct instead gives
every layer its own weights and times whole steps (a real decode step's memory traffic),
printing only the step rows. Shared, noisy machines: read the ratios, not the absolute
numbers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from kernels.fp16_linear import pack_fp16
from kernels.int4_linear import pack_int4
from kernels.int8_linear import pack_int8
from kernels.packed_linear import packed_linear
from kernels.packed_weight import pack_dense

# (name, K, N, times per decode step)
SHAPES = {
    "smollm2-135m": [("qkv", 576, 960, 30), ("o_proj", 576, 576, 30),
                     ("gate_up", 576, 3072, 30), ("down", 1536, 576, 30),
                     ("lm_head", 576, 49152, 1)],
    "gemma3-270m": [("qkv", 640, 1536, 18), ("o_proj", 1024, 640, 18),
                    ("gate_up", 640, 4096, 18), ("down", 2048, 640, 18),
                    ("lm_head", 640, 262144, 1)],
    "qwen2.5-0.5b": [("qkv", 896, 1152, 24), ("o_proj", 896, 896, 24),
                     ("gate_up", 896, 9728, 24), ("down", 4864, 896, 24),
                     ("lm_head", 896, 151936, 1)],
}


def _packed(pack, dtype: torch.dtype):
    """A format whose weight `pack(w)` builds, run through packed_linear."""
    def build(w: torch.Tensor):
        p = pack(w)
        return lambda x: packed_linear(x, p)
    return build, dtype


# name → (w → callable x → y, activation dtype fed to it)
FORMATS = {
    "fp32 F.linear": (lambda w: lambda x: F.linear(x, w), torch.float32),
    "fp32 packed": _packed(lambda w: pack_dense(w, "float32"), torch.float32),
    "bf16 F.linear": (lambda w: (lambda b: lambda x: F.linear(x, b))(w.bfloat16()),
                      torch.bfloat16),
    "bf16 packed(fp32 x)": _packed(lambda w: pack_dense(w, "bfloat16"), torch.float32),
    "int8 bf16-act": _packed(pack_int8, torch.bfloat16),
    "int8 fp32-act": _packed(lambda w: pack_int8(w, compute_dtype=torch.float32),
                             torch.float32),
    "int4g32 bf16-act": _packed(lambda w: pack_int4(w, 32), torch.bfloat16),
    "int4g64 bf16-act": _packed(lambda w: pack_int4(w, 64), torch.bfloat16),
    "int4g32 fp32-act": _packed(lambda w: pack_int4(w, 32, compute_dtype=torch.float32),
                                torch.float32),
    "fp16 (fbgemm)": _packed(pack_fp16, torch.float32),
}


def _formats(w: torch.Tensor, names=FORMATS) -> dict[str, tuple[object, torch.dtype]]:
    """name → (callable x → y, activation dtype fed to it), for the formats named."""
    return {name: (FORMATS[name][0](w), FORMATS[name][1]) for name in names}


def _distinct_steps(args: argparse.Namespace) -> None:
    """Whole decode steps, every layer with its own weights, in the chosen formats."""
    layers = []  # per linear: (K, {format: (fn, activation dtype)})
    for _name, k, n, count in SHAPES[args.model]:
        for _ in range(count):
            layers.append((k, _formats(torch.randn(n, k) * 0.05, args.formats)))
    for m in args.ms:
        xs = {(k, dt): torch.randn(m, k).to(dt) for k, _ in layers
              for dt in (torch.float32, torch.bfloat16)}
        samples: dict[str, list[float]] = {f: [] for f in args.formats}
        for _ in range(args.reps + 1):  # the first round warms up
            for f in args.formats:
                start = time.perf_counter()
                for k, formats in layers:
                    fn, dt = formats[f]
                    fn(xs[k, dt])
                samples[f].append((time.perf_counter() - start) * 1e3)
        base = statistics.median(samples[args.formats[0]][1:])
        cells = [f"{f} {statistics.median(s[1:]):.1f}ms x{base / statistics.median(s[1:]):.2f}"
                 for f, s in samples.items()]
        print(f"step ({len(layers)} distinct linears) M={m:2d} | " + " | ".join(cells),
              flush=True)


def _time(fn, x: torch.Tensor, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn(x)
    return (time.perf_counter() - start) / inner * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--ms", type=int, nargs="*", default=[1, 4, 16])
    ap.add_argument("--model", choices=sorted(SHAPES), default="smollm2-135m")
    ap.add_argument("--distinct", action="store_true",
                    help="time whole steps with distinct weights per layer")
    ap.add_argument("--formats", nargs="*", choices=list(FORMATS),
                    default=["fp32 F.linear", "int8 bf16-act", "int4g32 bf16-act",
                             "fp16 (fbgemm)"],
                    help="with --distinct: the formats, the first is the baseline")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, threads {args.threads}, {args.model}")
    if args.distinct:
        _distinct_steps(args)
        return
    step: dict[tuple[str, int], float] = {}
    for name, k, n, count in SHAPES[args.model]:
        formats = _formats(torch.randn(n, k) * 0.05)
        inner = 3 if n > 10000 else 20
        for m in args.ms:
            xs = {dt: torch.randn(m, k).to(dt) for dt in (torch.float32, torch.bfloat16)}
            samples: dict[str, list[float]] = {f: [] for f in formats}
            for fn, dt in formats.values():  # warm up
                fn(xs[dt])
            for _ in range(args.reps):
                for f, (fn, dt) in formats.items():
                    samples[f].append(_time(fn, xs[dt], inner))
            base = statistics.median(samples["fp32 F.linear"])
            cells = []
            for f, s in samples.items():
                med = statistics.median(s)
                step[f, m] = step.get((f, m), 0.0) + med * count
                cells.append(f"{f} {med:.3f}ms x{base / med:.2f}")
            print(f"{name:8s} K={k:5d} N={n:5d} M={m:2d} | " + " | ".join(cells), flush=True)
    for m in args.ms:
        base = step["fp32 F.linear", m]
        cells = [f"{f} {step[f, mm]:.1f}ms x{base / step[f, mm]:.2f}"
                 for f, mm in step if mm == m]
        num_linears = sum(count for *_, count in SHAPES[args.model])
        print(f"step ({num_linears} linears) M={m:2d} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
