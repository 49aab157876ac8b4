"""RMSNorm. Llama-style (`x̂ * w`) and Gemma-style (`x̂ * (1 + w)`, all in fp32), alone or
fused with the residual add before it (`add_rms_norm`).

Eager on the CPU, both run as one native pass over the rows
(kernels/csrc/layer_elementwise.cpp) with the reference's roundings; under autograd or
torch.compile, and elsewhere, the plain-torch formulas below."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.native import eager_ops


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       weight_offset: float = 0.0) -> torch.Tensor:
    """x: [..., D]; weight: [D]. Normalises in fp32 like the HF implementations.

    Llama casts back to x.dtype before the weight multiply; Gemma (weight_offset=1)
    multiplies in fp32 and casts last. The two differ only below fp32.
    """
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if weight_offset:
        return (x32 * (weight_offset + weight.float())).to(x.dtype)
    return weight * x32.to(x.dtype)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float, weight_offset: float = 0.0
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(residual + x), residual + x): a block's residual add, then the next norm."""
    total = residual + x
    return rms_norm_reference(total, weight, eps, weight_offset), total


def _native(x: torch.Tensor, weight: torch.Tensor):
    ops = eager_ops(x)
    if ops is None or weight.dtype != x.dtype or x.dim() > 3 or x.stride(-1) != 1:
        return None
    return ops


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             weight_offset: float = 0.0) -> torch.Tensor:
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"rms_norm: last dim {x.shape[-1]} != weight {weight.shape[-1]}")
    ops = _native(x, weight)
    if ops is not None:
        return ops.rms_norm(x, weight, eps, weight_offset)
    if x.dtype == torch.float32 and not weight_offset:
        # one fused op instead of five; identical maths in fp32
        return F.rms_norm(x, weight.shape, weight, eps)
    return rms_norm_reference(x, weight, eps, weight_offset)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 weight_offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(residual + x), residual + x), the sum rounded to x's dtype first."""
    if x.shape != residual.shape:
        raise ValueError(f"add_rms_norm: x {tuple(x.shape)} vs residual {tuple(residual.shape)}")
    ops = _native(x, weight)
    if (ops is not None and residual.dtype == x.dtype and residual.dim() <= 3
            and residual.stride(-1) == 1):
        return ops.add_rms_norm(x, residual, weight, eps, weight_offset)
    total = residual + x
    return rms_norm(total, weight, eps, weight_offset), total
