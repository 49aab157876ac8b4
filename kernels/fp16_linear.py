"""fp16 weights × fp32 activations: FBGEMM's packed fp16 GEMM on x86 CPUs.

torch ships FBGEMM's kernel as two aten ops:
  `fbgemm_pack_gemm_matrix_fp16(w fp32 [N, K])` → a handle: a uint8 tensor whose storage
      owns the packed fp16 matrix (its bytes are a pointer, not the weights);
  `fbgemm_linear_fp16_weight_fp32_activation(x fp32 [M, K], handle, bias fp32 [N])`.
The kernel streams half the fp32 weight bytes and widens fp16 → fp32 in registers (F16C),
so activations, accumulation and output stay fp32: no bf16 rounding of activations or
logits. On a CPU without native bf16 it is the fast 16-bit path: dense bf16/fp16
`F.linear` runs emulated there (0.2-0.8x fp32), and the int8/int4 kernels want bf16
activations (docs/weights.md has the figures). FBGEMM stores K in blocks of 512,
zero-padded: 2·N·⌈K/512⌉·512 bytes, half of fp32's at K = 1536, 0.57 of it at Qwen's 896,
0.8 at Gemma's 640. fp16 holds an 11-bit significand, so a GGUF Q5_0/Q6_K/Q8_0 weight (a
small integer times an fp16 scale) is kept to a relative 2⁻¹¹.

torch runs that kernel on one thread. slotmesh's native op (kernels/csrc/fp16_gemm.cpp,
built by kernels/native.py) runs the same kernel over torch's intra-op threads, splitting
the output columns as FBGEMM's thread partition does (measured 1.7-2.0x on 2 cores at
M = 1..512), and keeps the packed matrix in an ordinary fp16 tensor: `data` is that
tensor, which compiles, clones and freezes like any weight. Its last block of K rows is
stored compactly, so it holds 2·K·⌈N/16⌉·16 bytes (⌈N/32⌉·32 with AVX-512).
`native_fp16_available()` checks it against torch's op, bit for bit, before using it.

Without the native op, torch's handle is used: it cannot be traced (fake tensors have no
pointer to follow) nor copied (a clone's bytes are not a handle, and inductor's freezing
clones constants), so the graph never sees it: the call is the custom op
`slotmesh::fp16_linear(x, key, ...)`, opaque to torch.compile, and `key` is an int naming
the handle in a registry of live weights.

Without FBGEMM (CUDA, ARM builds) a float16 weight is the plain fp16 [N, K] tensor and
`kernels.packed_linear` multiplies it with `F.linear` in fp16, as the dense format does.
`fp16_linear_reference` multiplies by the same fp16 weight, widened, with fp32 `F.linear`.
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from functools import cache

import torch
import torch.nn.functional as F

from kernels.native import native_ops
from kernels.packed_weight import PackedWeight, check_weight, pack_dense

FP16_MAX = 65504.0
FBGEMM_LAYOUT = "fbgemm"
FBGEMM_BLOCK_K = 512  # PackedGemmMatrixFP16's block of rows of Wᵀ (K)

# key → handle of every live packed weight; an entry goes when its PackedWeight does
_HANDLES: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
_KEYS = itertools.count(1)


@cache
def fbgemm_fp16_available() -> bool:
    """Whether this torch build and CPU run FBGEMM's fp16 GEMM (x86 with AVX2); probed
    once by packing and multiplying a tiny matrix."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    try:
        handle = _pack(torch.ones(8, 16))
        out = torch.ops.aten.fbgemm_linear_fp16_weight_fp32_activation(
            torch.ones(1, 16), handle, torch.zeros(8))
    except (RuntimeError, AttributeError):
        return False
    return bool((out == 16).all())


@cache
def native_fp16_available() -> bool:
    """Whether slotmesh's native multi-threaded FBGEMM op is built here and gives torch's
    single-threaded op's results bit for bit (an odd shape: K past one 512 block, N not a
    multiple of the column block, a bias)."""
    ops = native_ops()
    if ops is None or not fbgemm_fp16_available():
        return False
    gen = torch.Generator().manual_seed(0)
    w, x, b = (torch.randn(shape, generator=gen) for shape in ((40, 600), (3, 600), (40,)))
    try:
        got = ops.fp16_gemm(x, ops.fp16_pack(w), 40, b)
    except RuntimeError:
        return False
    return torch.equal(got, torch.ops.aten.fbgemm_linear_fp16_weight_fp32_activation(
        x, _pack(w), b))


def _pack(weight: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # "deprecated" in torch 2.13; the probe above guards it
        warnings.simplefilter("ignore")
        return torch.ops.aten.fbgemm_pack_gemm_matrix_fp16(weight.float().contiguous())


def to_fp16(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] float → fp16, saturating at ±65504 (fp16 kept as is)."""
    if weight.dtype == torch.float16:
        return weight
    return weight.float().clamp(-FP16_MAX, FP16_MAX).half()


def pack_fp16(weight: torch.Tensor, bias: torch.Tensor | None = None) -> PackedWeight:
    """weight: [N, K] float → float16 PackedWeight on weight's device: FBGEMM's layout
    on a CPU that runs it, the plain fp16 tensor elsewhere."""
    half = to_fp16(weight.detach())
    if half.device.type == "cpu" and fbgemm_fp16_available():
        return pack_fp16_fbgemm(half, bias)
    return pack_dense(half, "float16", bias)


def pack_fp16_fbgemm(weight: torch.Tensor, bias: torch.Tensor | None = None
                     ) -> PackedWeight:
    """weight: [N, K] float on the CPU → float16 PackedWeight in FBGEMM's layout.

    The weight is rounded to fp16 first, so the packed matrix holds exactly the values
    `fp16_linear_reference` multiplies by. `data` is the native op's packed fp16 tensor,
    or without it torch's handle, and then `num_bytes` counts the padded packed matrix
    behind the handle.
    """
    n, k = check_weight(weight, bias)
    if weight.device.type != "cpu":
        raise ValueError(f"pack_fp16_fbgemm: weight on {weight.device}, want the CPU")
    bias = None if bias is None else bias.detach().float().contiguous()
    if native_fp16_available():
        return PackedWeight(
            format="float16", layout=FBGEMM_LAYOUT,
            data=native_ops().fp16_pack(to_fp16(weight.detach()).float()), out_features=n,
            in_features=k, compute_dtype=torch.float32, bias=bias)
    handle, key = _pack(to_fp16(weight.detach())), next(_KEYS)
    _HANDLES[key] = handle
    padded_k = -(-k // FBGEMM_BLOCK_K) * FBGEMM_BLOCK_K
    return PackedWeight(
        format="float16", layout=FBGEMM_LAYOUT, data=handle, handle_key=key,
        out_features=n, in_features=k, compute_dtype=torch.float32, bias=bias,
        packed_bytes=2 * n * padded_k,
    )


@torch.library.custom_op("slotmesh::fp16_linear", mutates_args=())
def _fp16_linear_op(x: torch.Tensor, key: int, bias: torch.Tensor | None,
                    out_features: int) -> torch.Tensor:
    return torch.ops.aten.fbgemm_linear_fp16_weight_fp32_activation(x, _HANDLES[key], bias)


@_fp16_linear_op.register_fake
def _(x, key, bias, out_features):
    return x.new_empty((x.shape[0], out_features))


def fp16_linear(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """x: [..., K] → [..., N] in x's dtype; w packed by `pack_fp16_fbgemm`."""
    if w.layout != FBGEMM_LAYOUT:
        raise ValueError(f"fp16_linear: weight layout is {w.layout!r}, want {FBGEMM_LAYOUT}")
    if x.shape[-1] != w.in_features:
        raise ValueError(f"fp16_linear: x {tuple(x.shape)} vs weight [{w.out_features}, "
                         f"{w.in_features}]")
    x2 = x.reshape(-1, w.in_features).float().contiguous()  # [M, K]
    if w.handle_key:  # torch's single-threaded op, through the handle registry
        out = _fp16_linear_op(x2, w.handle_key, w.bias, w.out_features)  # [M, N] fp32
    else:
        out = torch.ops.slotmesh_native.fp16_gemm(x2, w.data, w.out_features, w.bias)
    return out.to(x.dtype).reshape(*x.shape[:-1], w.out_features)


def fp16_linear_reference(x: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., K]; weight: [N, K] → the weight rounded to fp16, then fp32 F.linear, in
    x's dtype."""
    out = F.linear(x.float(), to_fp16(weight).float(), None if bias is None else bias.float())
    return out.to(x.dtype)


def unpack_fp16_fbgemm(w: PackedWeight) -> torch.Tensor:
    """The fp32 [N, K] weight in FBGEMM's layout, read back through the kernel: an
    identity batch gives Wᵀ, exactly (each output is one fp16 value widened, times 1)."""
    bare = PackedWeight(format="float16", layout=FBGEMM_LAYOUT, data=w.data,
                        handle_key=w.handle_key, out_features=w.out_features,
                        in_features=w.in_features, compute_dtype=torch.float32)
    return fp16_linear(torch.eye(w.in_features), bare).t().contiguous()
