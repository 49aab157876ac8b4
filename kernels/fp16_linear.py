"""fp16 weight-only linear with fp32 activations, accumulation and output.

On a CPU torch built with fbgemm (x86), `torch.ops.quantized.linear_prepack_fp16(w [N, K],
bias)` stores w once in fbgemm's blocked fp16 layout (2 bytes a weight; `data` is that
opaque packed object) and `linear_dynamic_fp16(x fp32 [M, K], packed)` widens the blocks to
fp32 in registers (F16C) and accumulates in fp32. No bf16 rounding of activations or
logits, and on a 2-core AVX2 EPYC faster than fp32 `F.linear` and than int8 at M = 1..16
(docs/weights.md). fbgemm stores K in blocks of 512, zero-padded: 2·N·⌈K/512⌉·512 bytes,
half of fp32's at K = 1536 or 2048, 0.57 of it at Qwen's 896, 0.8 at Gemma's 640. fp16
holds an 11-bit significand, so a GGUF Q5_0/Q6_K/Q8_0 weight (a small integer times an
fp16 scale) is kept to a relative 2⁻¹¹.

Without fbgemm (CUDA, ARM builds) `data` is the plain fp16 [N, K] tensor and the product
runs in fp16 through `F.linear`, as the dense float16 format does (the output is fp16
rounded before it is cast back).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.packed_weight import PackedWeight, check_weight, flat_input

FP16_MAX = 65504.0
FBGEMM_BLOCK_K = 512  # PackedGemmMatrixFP16's default block of rows of Wᵀ (K)


def has_fbgemm_fp16(device: torch.device | str) -> bool:
    """Whether fbgemm's fp16 GEMM can run this device's weights (CPU builds with fbgemm)."""
    return (torch.device(device).type == "cpu"
            and "fbgemm" in torch.backends.quantized.supported_engines)


def pack_fp16(weight: torch.Tensor, bias: torch.Tensor | None = None) -> PackedWeight:
    """weight: [N, K] float (fp16 kept as is, wider types rounded to fp16, saturating at
    ±65504) → fp16 PackedWeight on weight's device."""
    n, k = check_weight(weight, bias)
    half = weight.detach()
    if half.dtype != torch.float16:
        half = half.float().clamp(-FP16_MAX, FP16_MAX).half()
    if has_fbgemm_fp16(half.device):
        fp32_bias = None if bias is None else bias.detach().float().contiguous()
        data = torch.ops.quantized.linear_prepack_fp16(half.contiguous(), fp32_bias)
        padded_k = -(-k // FBGEMM_BLOCK_K) * FBGEMM_BLOCK_K
        return PackedWeight(format="fp16", data=data, out_features=n, in_features=k,
                            compute_dtype=torch.float32, bias=fp32_bias,
                            opaque_bytes=2 * n * padded_k)
    return PackedWeight(format="fp16", data=half.contiguous(), out_features=n, in_features=k,
                        compute_dtype=torch.float16,
                        bias=None if bias is None else bias.detach().half())


def fp16_weight(w: PackedWeight) -> torch.Tensor:
    """The fp16 [N, K] weight a fp16 PackedWeight multiplies by (unpacked when fbgemm
    holds it: a full copy, meant for tests and checks)."""
    if isinstance(w.data, torch.Tensor):
        return w.data
    return torch.ops.quantized.linear_unpack_fp16(w.data)[0].half()


def fp16_linear_reference(x: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K]; weight: [N, K] → [M, N]: the weight rounded to fp16, then fp32 F.linear."""
    w = weight.float().clamp(-FP16_MAX, FP16_MAX).half().float()
    out = F.linear(x.float(), w, None if bias is None else bias.float())
    return out.to(x.dtype)


def fp16_linear(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """x: [..., K] → [..., N] in x's dtype."""
    x2 = flat_input(x, w, "fp16")  # [M, K]
    if isinstance(w.data, torch.Tensor):
        out = F.linear(x2, w.data, w.bias)
    else:
        out = torch.ops.quantized.linear_dynamic_fp16(x2, w.data)  # bias applied inside
    return out.to(x.dtype).reshape(*x.shape[:-1], w.out_features)
