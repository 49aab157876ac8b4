"""int8 weight-only linear: y = x (q * s)ᵀ + b with q int8 [N, K] and one scale per row.

`torch.ops.aten._weight_int8pack_mm(x [M, K], q [N, K] int8, scales [N])` reads a quarter
of the fp32 weight bytes and dequantizes in registers; decode-sized M is bandwidth bound,
so it is 2.5-5x faster than fp32 `F.linear` at M = 1 (MODELS.md). Its scales must have
x's dtype, and on the CPU it wants bf16 activations (fp32 ones take the slow path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.packed_weight import PackedWeight, check_weight, flat_input


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight: [N, K] float → (q int8 [N, K], scales fp32 [N]), symmetric per row:
    scale = max|w| / 127, q = round(w / scale) in [-127, 127]."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # [N]
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def pack_int8(weight: torch.Tensor, bias: torch.Tensor | None = None,
              compute_dtype: torch.dtype = torch.bfloat16) -> PackedWeight:
    """weight: [N, K] float → int8 PackedWeight (per-channel symmetric quantization)."""
    check_weight(weight, bias)
    q, scales = quantize_int8(weight)
    return pack_int8_quantized(q, scales, bias, compute_dtype)


def pack_int8_quantized(q: torch.Tensor, scales: torch.Tensor,
                        bias: torch.Tensor | None = None,
                        compute_dtype: torch.dtype = torch.bfloat16) -> PackedWeight:
    """q: int8 [N, K]; scales: [N] → PackedWeight. The layout is the kernel's as is."""
    n, k = check_weight(q, bias)
    if q.dtype != torch.int8 or tuple(scales.shape) != (n,):
        raise ValueError(f"pack_int8: q {q.dtype} {tuple(q.shape)}, scales "
                         f"{tuple(scales.shape)}; want int8 [N, K] and [N]")
    return PackedWeight(
        format="int8", data=q.contiguous(), scales=scales.to(compute_dtype).contiguous(),
        out_features=n, in_features=k, compute_dtype=compute_dtype,
        bias=None if bias is None else bias.detach().to(compute_dtype),
    )


def int8_linear_reference(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K]; q: int8 [N, K]; scales: [N] → [M, N], dequantize then F.linear in fp32."""
    weight = q.float() * scales.float()[:, None]
    out = F.linear(x.float(), weight, None if bias is None else bias.float())
    return out.to(x.dtype)


def int8_linear(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """x: [..., K] → [..., N] in x's dtype."""
    x2 = flat_input(x, w, "int8")  # [M, K]
    out = torch.ops.aten._weight_int8pack_mm(x2, w.data, w.scales)  # [M, N]
    if w.bias is not None:
        out = out + w.bias
    return out.to(x.dtype).reshape(*x.shape[:-1], w.out_features)
