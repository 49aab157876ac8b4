"""y = x Wᵀ + b for a `PackedWeight` of any format: the one seam the model calls.

Dense weights run in their own dtype (x is cast to it, the output cast back): fp32 goes
through `kernels.linear` (MKL's transposed orientation is faster at small M), bf16/fp16
through `F.linear` (faster than the transposed mm for bf16, MODELS.md), or, prepacked for
oneDNN (`PackedWeight.prepacked`), through slotmesh's `prepacked_linear`; fp16 packed for
FBGEMM (x86 CPUs) through `kernels.fp16_linear` with fp32 activations. The quantized
formats go to their weight-only kernels: on the CPU, with slotmesh's native op, 4- and
8-bit blocks of 32 with fp32 activations (`kernels.block_linear`, layout "blocks"),
otherwise torch's int4/int8 kernels with bf16 activations. `packed_linear_reference`
dequantizes and calls `F.linear` in fp32 for every format.

A block weight with a `batched` twin (`--weights auto+bfloat16`) multiplies steps of up
to BLOCK_ROWS rows by its blocks and larger ones by the twin: the block op's integer work
grows with every row of x while oneDNN's bf16 GEMM reads the weights once for any M
(SmolLM2-135M, compiled decode step, AVX-512 EPYC, 2 threads: blocks 9.6-12.8 ms at batch
1, 16.5-18.8 at 2; bf16 weights ~22 at 1, 31 at 16; `bench peers` at 4 sequences: blocks
134.5 tok/s, bf16 149.7), and prefill goes to the GEMM.
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
    if w.prepacked is not None:  # oneDNN's layout (kernels/csrc/prepacked_linear.cpp)
        x2 = xc.reshape(-1, w.in_features)
        out = torch.ops.slotmesh_native.prepacked_linear(x2, w.prepacked, w.bias,
                                                         w.out_features)
        return out.to(x.dtype).reshape(*x.shape[:-1], w.out_features)
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


# a block weight's twin takes steps of more rows than this. At 2 rows the blocks were
# still ~15% ahead, but a limit of 2 costs a third decode graph (~50 s more compiling
# when measured, frozen)
BLOCK_ROWS = 1


def packed_linear(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """x: [..., K] → [..., N] in x's dtype."""
    if x.shape[-1] != w.in_features:
        raise ValueError(f"packed_linear: x {tuple(x.shape)} vs {w.format} weight "
                         f"[{w.out_features}, {w.in_features}]")
    if w.layout == BLOCKS_LAYOUT:
        if w.batched is not None and x.numel() > BLOCK_ROWS * w.in_features:
            return _dense_linear(x, w.batched)
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
