"""4- and 8-bit block weights on the CPU: ggml's Q4_1 and Q8_0 blocks of 32.

A weight [N, K] (G = K / 32 blocks a row) is a uint8 tensor [N, G · B], each row its G
fp16 scales first, then its G blocks of values:
  Q4_1 (B = 20, format int4): G × fp16 d, G × fp16 m, then G × 16 bytes (byte j of a block:
        q[j] low nibble, q[j + 16] high); w = q·d + m, q in 0..15 — torch's int4
        convention w = (q − 8)·scale + zero is d = scale, m = zero − 8·scale;
  Q8_0 (B = 34, format int8, groups of 32): G × fp16 d, then G × 32 int8 q; w = q·d.
slotmesh's native op (kernels/csrc/block_gemm.cpp) multiplies them with fp32 activations
in, fp32 out. At decode-sized M (≤ 32 rows) it rounds each row of x to int16 in blocks
of 32 (scale max|x| / 32767: an activation moves by at most 1/65534 of its block's
largest, ~40x less than rounding it to bf16) and takes exact integer dot products, one fp32 scale a
block; larger M widens the weights to fp32 and calls the BLAS GEMM. torch's int4/int8 CPU
kernels (kernels/int4_linear.py, int8_linear.py) want bf16 activations and return bf16;
without native bf16 they run emulated, and bf16 logits turn near-ties into ties. These
blocks are what `auto` and `int4` use on the CPU when the native op is built
(`native_blocks_available`). The weights stream at 5 / 8.5 bits.

GGUF's Q4_0 / Q4_1 / Q8_0 blocks map onto these exactly; Q4_K's scale d·sc and min
dmin·mn are rounded to fp16 (relative 2⁻¹¹).

`block_linear_reference` (and `dequantize_blocks`) widen in plain torch and multiply in
fp32: the reference the native op is tested against, and how an embedding table's rows
are read.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

from kernels.int4_linear import quantize_int4
from kernels.native import native_ops
from kernels.packed_weight import PackedWeight, check_weight, flat_input

BLOCK = 32
BLOCKS_LAYOUT = "blocks"
KINDS = {"int4": 0, "int8": 1}  # the native op's `kind`: Q4_1, Q8_0
BLOCK_BYTES = {"int4": 20, "int8": 34}


def _check_k(k: int) -> None:
    if k % BLOCK:
        raise ValueError(f"blocks: K={k} is not a multiple of {BLOCK}")


def q4_blocks(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """q uint8 [N, K] in 0..15, scales and zeros [N, K/32] (w = (q − 8)·scale + zero)
    → Q4_1 blocks uint8 [N, K/32 · 20]."""
    n, k = q.shape
    _check_k(k)
    g = k // BLOCK
    if tuple(scales.shape) != (n, g) or tuple(zeros.shape) != (n, g):
        raise ValueError(f"q4_blocks: scales {tuple(scales.shape)} / zeros "
                         f"{tuple(zeros.shape)}, want {(n, g)}")
    d = scales.float()
    m = zeros.float() - 8.0 * d
    qg = q.to(torch.uint8).reshape(n, g, BLOCK)
    scales = torch.cat([d, m], dim=1).half().view(torch.uint8)  # [N, 4G]: G d, then G m
    nibbles = qg[..., :16] | (qg[..., 16:] << 4)  # [N, G, 16]
    return torch.cat([scales, nibbles.reshape(n, 16 * g)], dim=1)


def q8_blocks(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """q int8 [N, K], scales [N, K/32] (w = q·scale) → Q8_0 blocks uint8 [N, K/32 · 34]."""
    n, k = q.shape
    _check_k(k)
    g = k // BLOCK
    if tuple(scales.shape) != (n, g):
        raise ValueError(f"q8_blocks: scales {tuple(scales.shape)}, want {(n, g)}")
    d = scales.float().half().contiguous().view(torch.uint8)  # [N, 2G]
    return torch.cat([d, q.to(torch.int8).view(torch.uint8)], dim=1)


def quantize_q8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] float → (q int8 [N, K], scales fp32 [N, K/32]): symmetric per block
    of 32, scale max|w| / 127 rounded to fp16 first (the stored value), |q| ≤ 127."""
    n, k = weight.shape
    _check_k(k)
    w = weight.detach().float().reshape(n, k // BLOCK, BLOCK)
    scales = (w.abs().amax(dim=-1) / 127.0).half().float()  # [N, K/32]
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(w / safe[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(n, k), scales


def dequantize_blocks(blocks: torch.Tensor, fmt: str, k: int) -> torch.Tensor:
    """Blocks uint8 [..., K/32 · B] (any leading shape, e.g. gathered rows) → fp32 [..., K]."""
    lead, g = blocks.shape[:-1], k // BLOCK
    scale_bytes = 4 if fmt == "int4" else 2
    scales = blocks[..., :scale_bytes * g].contiguous().view(torch.float16).float()
    scales = scales.reshape(*lead, scale_bytes // 2, g, 1)  # [..., d (, m), G, 1]
    qs = blocks[..., scale_bytes * g:].reshape(*lead, g, -1)
    if fmt == "int4":
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()  # [..., G, 32]
        w = q * scales[..., 0, :, :] + scales[..., 1, :, :]
    else:
        w = qs.contiguous().view(torch.int8).float() * scales[..., 0, :, :]
    return w.reshape(*lead, k)


def pack_blocks(blocks: torch.Tensor, fmt: str, n: int, k: int,
                bias: torch.Tensor | None = None) -> PackedWeight:
    """Blocks of `fmt` (int4: Q4_1, int8: Q8_0) for an [n, k] weight → PackedWeight."""
    if tuple(blocks.shape) != (n, k // BLOCK * BLOCK_BYTES[fmt]) or k % BLOCK:
        raise ValueError(f"pack_blocks: {tuple(blocks.shape)} is not a {fmt} [{n}, {k}]")
    if bias is not None:
        check_weight(blocks.new_empty(n, 0), bias)
    return PackedWeight(
        format=fmt, data=blocks.contiguous(), out_features=n, in_features=k,
        compute_dtype=torch.float32, group_size=BLOCK, layout=BLOCKS_LAYOUT,
        bias=None if bias is None else bias.detach().float(),
    )


def block_linear(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """x: [..., K] → [..., N] in x's dtype, through the native op."""
    x2 = flat_input(x, w, w.format).contiguous()  # fp32 [M, K]
    out = torch.ops.slotmesh_native.block_gemm(x2, w.data, w.out_features, KINDS[w.format],
                                               w.bias)
    return out.to(x.dtype).reshape(*x.shape[:-1], w.out_features)


def block_linear_reference(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """Widen in torch, then fp32 `F.linear`; x: [..., K] → [..., N] in x's dtype."""
    weight = dequantize_blocks(w.data, w.format, w.in_features)
    bias = None if w.bias is None else w.bias.float()
    return F.linear(x.float(), weight, bias).to(x.dtype)


DIRECT_ROWS = 32  # block_gemm.cpp's kDirectRows: up to this M, x is rounded to int16


def error_bound(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """[M, N]: how far `block_linear` may be from `block_linear_reference` — at M ≤ 32
    the int16 rounding of x (each value by at most half its block's step max|x| / 32767)
    times |w|, plus fp32 summation (2⁻²⁰ of Σ|w·x|) either way."""
    x2 = x.reshape(-1, w.in_features).float()
    weight = dequantize_blocks(w.data, w.format, w.in_features).abs()
    slack = F.linear(x2.abs(), weight) * 2.0**-20
    if x2.shape[0] > DIRECT_ROWS:
        return slack
    step = x2.abs().reshape(x2.shape[0], -1, BLOCK).amax(dim=-1) / 32767.0  # [M, G]
    half_steps = step.repeat_interleave(BLOCK, dim=1) / 2  # [M, K]
    return F.linear(half_steps, weight) + slack


@cache
def native_blocks_available() -> bool:
    """Whether the native block op is built here and agrees with the torch reference on
    both kinds, on the direct (M ≤ 32) and panel (larger M) paths, with a bias."""
    if native_ops() is None:
        return False
    gen = torch.Generator().manual_seed(0)
    n, k = 37, 96
    weight = torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    q4 = pack_blocks(q4_blocks(*quantize_int4(weight, BLOCK)), "int4", n, k, bias)
    q8 = pack_blocks(q8_blocks(*quantize_q8(weight)), "int8", n, k, bias)
    for w in (q4, q8):
        for m in (1, 3, 5, 40):
            x = torch.randn(m, k, generator=gen)
            try:
                got = block_linear(x, w)
            except RuntimeError:
                return False
            if ((got - block_linear_reference(x, w)).abs() > error_bound(x, w)).any():
                return False
    return True
