"""y = x Wᵀ + b for a `PackedWeight` of any format: the one seam the model calls.

Dense weights run in their own dtype (x is cast to it, the output cast back): fp32 goes
through `kernels.linear` (MKL's transposed orientation is faster at small M), bf16/fp16
through `F.linear` (faster than the transposed mm for bf16, MODELS.md); fp16 packed for
FBGEMM (x86 CPUs) through `kernels.fp16_linear` with fp32 activations. The quantized
formats go to their weight-only kernels: on the CPU, with slotmesh's native op, 4- and
8-bit blocks of 32 with fp32 activations (`kernels.block_linear`, layout "blocks"),
otherwise torch's int4/int8 kernels with bf16 activations. `packed_linear_reference`
dequantizes and calls `F.linear` in fp32 for every format.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels.block_linear import BLOCKS_LAYOUT, block_linear, dequantize_blocks
from kernels.fp16_linear import FBGEMM_LAYOUT, fp16_linear, unpack_fp16_fbgemm
from kernels.int4_linear import int4_linear
from kernels.int8_linear import int8_linear
from kernels.linear import linear
from kernels.packed_weight import PackedWeight


def _dense_linear(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    if w.layout == FBGEMM_LAYOUT:
        return fp16_linear(x, w)
    xc = x.to(w.compute_dtype)
    if w.format == "float32" and x.dim() == 2:
        out = linear(xc, w.data, w.bias)
    else:
        out = F.linear(xc, w.data, w.bias)
    return out.to(x.dtype)


_KERNELS: dict[str, Callable[[torch.Tensor, PackedWeight], torch.Tensor]] = {
    "float32": _dense_linear,
    "bfloat16": _dense_linear,
    "float16": _dense_linear,
    "int8": int8_linear,
    "int4": int4_linear,
}


def packed_linear(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """x: [..., K] → [..., N] in x's dtype."""
    if x.shape[-1] != w.in_features:
        raise ValueError(f"packed_linear: x {tuple(x.shape)} vs {w.format} weight "
                         f"[{w.out_features}, {w.in_features}]")
    if w.layout == BLOCKS_LAYOUT:
        return block_linear(x, w)
    return _KERNELS[w.format](x, w)


def dequantize_packed(w: PackedWeight) -> torch.Tensor:
    """The fp32 [N, K] weight a PackedWeight multiplies by (any format, any device).

    int4's packed layout is opaque, so it is read back through the kernel itself: an
    identity batch gives Wᵀ. On the CPU that runs in fp32 (bf16 scales are exact in
    fp32), so it is exact; CUDA's kernel is bf16 only. Meant for tests and checks.
    """
    if w.layout == FBGEMM_LAYOUT:
        return unpack_fp16_fbgemm(w)
    if w.layout == BLOCKS_LAYOUT:
        return dequantize_blocks(w.data, w.format, w.in_features)
    if w.format in ("float32", "bfloat16", "float16"):
        return w.data.float()
    if w.format == "int8":
        return w.data.float() * w.scales.float()[:, None]
    dtype = torch.bfloat16 if w.data.device.type == "cuda" else torch.float32
    eye = torch.eye(w.in_features, dtype=dtype, device=w.data.device)
    bare = PackedWeight(format="int4", data=w.data, scales=w.scales.to(dtype),
                        group_size=w.group_size, out_features=w.out_features,
                        in_features=w.in_features, compute_dtype=dtype)
    return int4_linear(eye, bare).float().t().contiguous()  # [K, N] → [N, K]


def packed_linear_reference(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """Dequantize, then fp32 F.linear; x: [..., K] → [..., N] in x's dtype."""
    bias = None if w.bias is None else w.bias.float()
    return F.linear(x.float(), dequantize_packed(w), bias).to(x.dtype)
