"""int4 weight-only linear with groups of `group_size` along K (torch's int4pack kernels).

A weight is w[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n] with q in 0..15 and
g = k // group_size; `scales_and_zeros` is [K / group, N, 2] (scale, zero), the layout
both kernels take. The packed q is device specific:
  CPU:  `_convert_weight_to_int4pack_for_cpu(q int32 [N, K], inner_k_tiles)` +
        `_weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)`;
  CUDA: `_convert_weight_to_int4pack(q uint8 [N, K / 2] two nibbles a byte, inner_k_tiles)`
        + `_weight_int4pack_mm(x bf16, packed, group, scales_and_zeros bf16)`.
An eighth of the fp32 weight bytes: at decode-sized M this is 3.5-7x faster than fp32
`F.linear` on the CPU (MODELS.md). Both kernels want bf16 activations, and scales in x's
dtype; the CUDA branch is not exercised by the CPU test suite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.packed_weight import PackedWeight, check_weight, flat_input

GROUP_SIZES = (32, 64, 128, 256)


def quantize_int4(weight: torch.Tensor, group_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight: [N, K] float → (q uint8 [N, K] in 0..15, scales [N, K/g], zeros [N, K/g]),
    asymmetric min/max per group, fp32 scales, torch's zero convention (zero = min + 8s)."""
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # [N, K/g]
    scales = ((hi - lo) / 15.0).clamp_min(1e-12)
    q = torch.round((w - lo[..., None]) / scales[..., None]).clamp_(0, 15)
    return q.to(torch.uint8).reshape(n, k), scales, lo + 8.0 * scales


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """q uint8 [N, K]; scales, zeros [N, K/g] → fp32 [N, K] (the reference maths)."""
    n, k = q.shape
    qg = q.float().reshape(n, k // group_size, group_size) - 8.0
    return (qg * scales.float()[..., None] + zeros.float()[..., None]).reshape(n, k)


def _check_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int) -> tuple[int, int]:
    n, k = q.shape
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4: group size {group_size} not in {GROUP_SIZES}")
    if k % group_size or k % 16:
        raise ValueError(f"int4: K={k} is not a multiple of the group size {group_size} "
                         "and of 16")
    want = (n, k // group_size)
    if tuple(scales.shape) != want or tuple(zeros.shape) != want:
        raise ValueError(f"int4: scales {tuple(scales.shape)} / zeros {tuple(zeros.shape)}, "
                         f"want {want}")
    return n, k


def _inner_k_tiles(k: int) -> int:
    """The largest tile count the packers accept: K must be a multiple of 16 × tiles."""
    return next(t for t in (8, 4, 2) if k % (16 * t) == 0)


def _pack_q(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [N, K] in 0..15 → the int4pack layout of q's device."""
    tiles = _inner_k_tiles(q.shape[1])
    if q.device.type == "cuda":
        nibbles = (q[:, ::2] << 4 | q[:, 1::2]).contiguous()  # [N, K/2]: even k high
        return torch.ops.aten._convert_weight_to_int4pack(nibbles, tiles)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), tiles)


def pack_int4_quantized(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        group_size: int, bias: torch.Tensor | None = None,
                        compute_dtype: torch.dtype = torch.bfloat16) -> PackedWeight:
    """Already quantized weights (e.g. GGUF Q4 blocks) → int4 PackedWeight.

    q: uint8 [N, K] in 0..15; scales, zeros: [N, K / group_size]. Scales and zeros are
    rounded to compute_dtype (the kernel's requirement); that is the only loss.
    """
    n, k = _check_int4(q, scales, zeros, group_size)
    check_weight(q, bias)
    if compute_dtype != torch.bfloat16 and q.device.type == "cuda":
        raise ValueError("int4 on CUDA runs in bfloat16 only")
    sz = torch.stack([scales.t(), zeros.t()], dim=-1).to(compute_dtype)  # [K/g, N, 2]
    return PackedWeight(
        format="int4", data=_pack_q(q.to(torch.uint8)), scales=sz.contiguous(),
        group_size=group_size, out_features=n, in_features=k, compute_dtype=compute_dtype,
        bias=None if bias is None else bias.detach().to(compute_dtype),
    )


def pack_int4(weight: torch.Tensor, group_size: int = 32, bias: torch.Tensor | None = None,
              compute_dtype: torch.dtype = torch.bfloat16) -> PackedWeight:
    """weight: [N, K] float → int4 PackedWeight (min/max quantization per group)."""
    k = check_weight(weight, bias)[1]
    if group_size not in GROUP_SIZES or k % group_size:
        raise ValueError(f"int4: K={k} and group size {group_size} (one of {GROUP_SIZES})")
    q, scales, zeros = quantize_int4(weight, group_size)
    return pack_int4_quantized(q, scales, zeros, group_size, bias, compute_dtype)


def int4_linear_reference(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                          zeros: torch.Tensor, group_size: int,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K]; q uint8 [N, K]; scales, zeros [N, K/g] → [M, N]: dequantize, F.linear."""
    weight = dequantize_int4(q, scales, zeros, group_size)
    out = F.linear(x.float(), weight, None if bias is None else bias.float())
    return out.to(x.dtype)


def int4_linear(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """x: [..., K] → [..., N] in x's dtype."""
    x2 = flat_input(x, w, "int4").contiguous()  # [M, K]
    if x2.device.type == "cuda":
        out = torch.ops.aten._weight_int4pack_mm(x2, w.data, w.group_size, w.scales)
    else:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, w.data, w.group_size, w.scales)
    if w.bias is not None:
        out = out + w.bias
    return out.to(x.dtype).reshape(*x.shape[:-1], w.out_features)
