"""fp16 weights × fp32 activations on x86 CPUs: FBGEMM's packed fp16 GEMM.

torch ships FBGEMM's kernel as two aten ops:
  `fbgemm_pack_gemm_matrix_fp16(w fp32 [N, K])` → a handle: a uint8 tensor whose storage
      owns the packed fp16 matrix (its bytes are a pointer, not the weights);
  `fbgemm_linear_fp16_weight_fp32_activation(x fp32 [M, K], handle, bias fp32 [N])`.
The kernel streams half the fp32 weight bytes and widens fp16 → fp32 in registers (F16C),
so activations, accumulation and output stay fp32. On a CPU without native bf16 that is
the fast 16-bit path: dense bf16/fp16 `F.linear` runs emulated there (0.3-0.8x fp32),
and the int8/int4 kernels want bf16 activations (docs/weights.md has the figures).

The handle cannot be traced (fake tensors have no pointer to follow) nor copied (a
clone's bytes are not a handle, and inductor's freezing clones constants), so the graph
never sees it: the call is the custom op `slotmesh::fp16_linear(x, key, ...)`, opaque to
torch.compile, and `key` is an int naming the handle in a registry of live weights.
`fp16_linear_reference` multiplies by the same fp16 weight, widened, with `F.linear`.
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from functools import cache

import torch
import torch.nn.functional as F

from kernels.packed_weight import PackedWeight, check_weight

FBGEMM_LAYOUT = "fbgemm"

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


def _pack(weight: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # "deprecated" in torch 2.13; the probe above guards it
        warnings.simplefilter("ignore")
        return torch.ops.aten.fbgemm_pack_gemm_matrix_fp16(weight.float().contiguous())


def pack_fp16_fbgemm(weight: torch.Tensor, bias: torch.Tensor | None = None
                     ) -> PackedWeight:
    """weight: [N, K] float on the CPU → float16 PackedWeight in FBGEMM's layout.

    The weight is rounded to fp16 first, so the packed matrix holds exactly the values
    `fp16_linear_reference` multiplies by. `data` is the handle; `num_bytes` counts the
    packed fp16 matrix behind it.
    """
    n, k = check_weight(weight, bias)
    if weight.device.type != "cpu":
        raise ValueError(f"pack_fp16_fbgemm: weight on {weight.device}, want the CPU")
    handle, key = _pack(weight.detach().half()), next(_KEYS)
    _HANDLES[key] = handle
    return PackedWeight(
        format="float16", layout=FBGEMM_LAYOUT, data=handle, handle_key=key,
        out_features=n, in_features=k, compute_dtype=torch.float32,
        bias=None if bias is None else bias.detach().float().contiguous(),
        packed_bytes=2 * n * k,
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
    out = _fp16_linear_op(x2, w.handle_key, w.bias, w.out_features)  # [M, N] fp32
    return out.to(x.dtype).reshape(*x.shape[:-1], w.out_features)


def fp16_linear_reference(x: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., K]; weight: [N, K] (rounded to fp16 here) → F.linear in fp32, x's dtype."""
    w = weight.half().float()
    out = F.linear(x.float(), w, None if bias is None else bias.float())
    return out.to(x.dtype)


def unpack_fp16_fbgemm(w: PackedWeight) -> torch.Tensor:
    """The fp32 [N, K] weight behind a handle, read back through the kernel: an identity
    batch gives Wᵀ, exactly (each output is one fp16 value widened, times 1)."""
    eye = torch.eye(w.in_features)
    out = torch.ops.aten.fbgemm_linear_fp16_weight_fp32_activation(eye, w.data, None)
    return out.t().contiguous()
