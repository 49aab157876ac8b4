"""Dense projection y = x Wᵀ (+ b), the op every layer spends most of its time in.

On the CPU, MKL's sgemm runs the transposed orientation, y = (W xᵀ)ᵀ, 1.3–2× faster
for the small row counts of decode steps (measured on the 2-core AVX2 dev machine, whole
30-layer SmolLM2 body per step: M=2 63 → 31 ms, M=4 67 → 37 ms, M=16 78 → 59 ms; the
49,152-row lm_head at M=16 31 → 19 ms), and slower for prefill-sized M (512: ~1.3× slower,
largely the copy back to row-major). So it is used below `_CPU_SMALL_M` rows only. CUDA
and other devices take `F.linear` (cuBLAS picks its own layout), and so do 16-bit
activations: with bf16 on an AVX-512 + AVX512_BF16 EPYC, oneDNN's `F.linear` matched or
beat the transposed `mm` (30 layers' linears at M=4: 12.1 vs 17.9 ms; MODELS.md: 13.6 vs
19.8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_CPU_SMALL_M = 128


def linear_reference(x: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K]; weight: [N, K]; bias: [N] → [M, N]."""
    return F.linear(x, weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"linear: x {tuple(x.shape)} vs weight {tuple(weight.shape)}")
    if (x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2
            or x.shape[0] >= _CPU_SMALL_M):
        return F.linear(x, weight, bias)
    if bias is None:
        return torch.mm(weight, x.t()).t().contiguous()  # [N, M] → [M, N]
    return torch.addmm(bias[:, None], weight, x.t()).t().contiguous()
