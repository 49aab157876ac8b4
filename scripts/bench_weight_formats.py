"""Indicative microbenchmark of the weight formats on SmolLM2-135M's linear shapes.

    .venv/bin/python scripts/bench_weight_formats.py [--threads 1] [--reps 7]

Every format runs interleaved in the same process (one round = each format once, per
shape and M), median of `reps` rounds; the table gives ms per call and the ratio to fp32
`F.linear`, and a "step" row sums one decode step's 121 linears (30 layers of fused qkv,
o_proj, fused gate_up, down, plus the tied 49,152-row lm_head). Shared, noisy machines:
read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from kernels.fp16_linear import fbgemm_fp16_available, pack_fp16_fbgemm
from kernels.int4_linear import pack_int4
from kernels.int8_linear import pack_int8
from kernels.packed_linear import packed_linear
from kernels.packed_weight import pack_dense

# (name, K, N, times per decode step)
SHAPES = [("qkv", 576, 960, 30), ("o_proj", 576, 576, 30), ("gate_up", 576, 3072, 30),
          ("down", 1536, 576, 30), ("lm_head", 576, 49152, 1)]


def _formats(w: torch.Tensor) -> dict[str, tuple[object, torch.dtype]]:
    """name → (callable x → y, activation dtype fed to it)."""
    bf16 = w.bfloat16()
    p32, p16 = pack_dense(w, "float32"), pack_dense(w, "bfloat16")
    i8b, i4b = pack_int8(w), pack_int4(w, 32)
    i4b64 = pack_int4(w, 64)
    i8f = pack_int8(w, compute_dtype=torch.float32)
    i4f = pack_int4(w, 32, compute_dtype=torch.float32)
    formats = {
        "fp32 F.linear": (lambda x: F.linear(x, w), torch.float32),
        "fp32 packed": (lambda x: packed_linear(x, p32), torch.float32),
        "bf16 F.linear": (lambda x: F.linear(x, bf16), torch.bfloat16),
        "bf16 packed(fp32 x)": (lambda x: packed_linear(x, p16), torch.float32),
        "int8 bf16-act": (lambda x: packed_linear(x, i8b), torch.bfloat16),
        "int8 fp32-act": (lambda x: packed_linear(x, i8f), torch.float32),
        "int4g32 bf16-act": (lambda x: packed_linear(x, i4b), torch.bfloat16),
        "int4g64 bf16-act": (lambda x: packed_linear(x, i4b64), torch.bfloat16),
        "int4g32 fp32-act": (lambda x: packed_linear(x, i4f), torch.float32),
    }
    if fbgemm_fp16_available():  # x86: fp16 weights, fp32 activations
        f16 = pack_fp16_fbgemm(w)
        formats["fp16 fbgemm fp32-act"] = (lambda x: packed_linear(x, f16), torch.float32)
    return formats


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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, threads {args.threads}")
    step: dict[tuple[str, int], float] = {}
    for name, k, n, count in SHAPES:
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
        print(f"step (121 linears) M={m:2d} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
