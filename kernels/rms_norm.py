"""RMSNorm. Llama-style (`x̂ * w`) and Gemma-style (`x̂ * (1 + w)`, all in fp32)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             weight_offset: float = 0.0) -> torch.Tensor:
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"rms_norm: last dim {x.shape[-1]} != weight {weight.shape[-1]}")
    if x.dtype == torch.float32 and not weight_offset:
        # one fused op instead of five; identical maths in fp32
        return F.rms_norm(x, weight.shape, weight, eps)
    return rms_norm_reference(x, weight, eps, weight_offset)
